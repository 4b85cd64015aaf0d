"""Mosquitto stopped and started again mid-run: both sides reconnect to their persistent sessions,
the last wills the stopping broker fires do not cost a silo its round, and nothing is lost or
counted twice — the final model is exactly the uninterrupted run's."""
from __future__ import annotations

import time

import pytest

from octopusd.testing import Federation, Mosquitto

from .helpers import assert_every_round_trained_exactly, count_events, events, metrics, wait_for_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def broker(tmp_path):
    """A broker of this test's own (it is restarted), persisting sessions in tmp_path."""
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


def test_broker_restart_mid_round_loses_nothing(tmp_path, broker, moto_s3):
    """The broker goes away for ~2 s while silo 2 (20 epochs) trains round 1 and silo 1's update
    is already folded; silo 2 uploads during the outage. Everyone reconnects, every update of
    every round is folded exactly once, all processes exit 0 and the model matches the
    reference within 1e-5."""
    rounds = 3
    fed = Federation(tmp_path / "fed", broker.port, moto_s3.endpoint_url, rounds=rounds, silo_procs=(1, 1),
                     silo_sections={2: {"train_args": {"epochs": 20}}})
    try:
        fed.start_all()
        wait_for_event(fed, "server", "update_folded", 150, silo=1, round=1)
        assert count_events(fed, "server", "update_folded", silo=2, round=1) == 0
        broker.stop()
        wait_for_event(fed, "silo2", "trainer_round_done", 30, round=1)
        time.sleep(1.0)  # the outage lasts a little longer than the training
        broker.start()

        codes = fed.wait_all(timeout_s=150)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        for name in ("server", "silo1", "silo2"):
            assert count_events(fed, name, "mqtt_connected") >= 2, f"{name} did not reconnect"
        for r in range(rounds):
            for silo in (1, 2):
                assert count_events(fed, "server", "update_folded", silo=silo, round=r) == 1, (silo, r)
        assert [m["silos"] for m in metrics(fed)] == [[1, 2]] * rounds
        # The stopping broker fired both silos' wills: seen, and forgiven once they came back.
        assert not any(e.get("event") == "silo_dropped_from_round" for e in events(fed, "server"))
        assert_every_round_trained_exactly(fed, rounds)
    finally:
        fed.stop()
