"""Shared fixtures: real Mosquitto and moto_server processes on free loopback ports."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from octopusd.testing import Mosquitto, MotoServer

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory):
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoServer().start()
    yield server
    server.stop()
