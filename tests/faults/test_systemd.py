"""systemd integration: sd_notify (READY, WATCHDOG, STATUS, STOPPING) over a datagram socket the
test owns, the unit files pass `systemd-analyze verify`, and the exit codes the units rely on
(69: broker unreachable within comm_args.connect_timeout_s; 78: a bad lifecycle setting)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from octopusd.errors import ExitCode
from octopusd.testing import Federation, free_port

from .helpers import silo_pids, wait_for, wait_for_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket collecting what the daemon sends."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"octopusd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="sdn")     # short: AF_UNIX paths max 107 bytes
            path = os.path.join(self._dir, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, OSError):
                continue

    def fields(self, key: str) -> list[str]:
        return [line.split("=", 1)[1] for m in list(self.messages) for line in m.splitlines()
                if line.startswith(key + "=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("role", ["server", "silo"])
def test_daemon_speaks_sd_notify(tmp_path, mosquitto, moto_s3, role):
    """READY=1 once connected (with a STATUS line), WATCHDOG=1 every half WATCHDOG_USEC, and on
    SIGTERM STOPPING=1 and exit 0 (the silo with its trainers gone) — over a filesystem socket
    for the server and an abstract ('@') one for the silo."""
    listener = NotifyListener(abstract=role == "silo")
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=1, silo_procs=(1,),
                     overrides={"common_args": {"shutdown_grace_s": 6}})
    rank = 0 if role == "server" else 1
    try:
        proc = fed.start(role, rank, env={"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "400000"})
        wait_for("READY=1", lambda: "1" in listener.fields("READY"), 60)
        assert listener.fields("STATUS"), listener.messages
        wait_for("three WATCHDOG=1", lambda: len(listener.fields("WATCHDOG")) >= 3, 5)
        assert "1" not in listener.fields("STOPPING")
        if role == "silo":
            wait_for_event(fed, "silo1", "trainer_group_launched", 30)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, fed.log_text("server" if rank == 0 else "silo1")[-3000:]
        assert "1" in listener.fields("STOPPING")
        if role == "silo":
            assert silo_pids(fed, 1) == []
    finally:
        listener.close()
        fed.stop()


@pytest.mark.parametrize("role", ["server", "silo"])
def test_unreachable_broker_exits_69_within_the_connect_timeout(tmp_path, moto_s3, role):
    """With nothing listening on BROKER_PORT and comm_args.connect_timeout_s 2, the daemon exits
    69 (EX_UNAVAILABLE, which systemd restarts) instead of retrying forever."""
    fed = Federation(tmp_path, free_port(), moto_s3.endpoint_url, rounds=1, silo_procs=(1,),
                     overrides={"comm_args": {"connect_timeout_s": 2}})
    name = "server" if role == "server" else "silo1"
    try:
        t0 = time.monotonic()
        proc = fed.start(role, 0 if role == "server" else 1)
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
        log = fed.log_text(name)
        assert code == ExitCode.BROKER_UNREACHABLE, log[-3000:]
        assert "unreachable for 2 s" in log
        # Start-up (imports, data) plus the 2 s deadline; not the 30 s default nor forever.
        assert took < 25, took
    finally:
        fed.stop()


def test_a_bad_lifecycle_setting_is_a_config_error(tmp_path):
    """A negative common_args.shutdown_grace_s fails start-up with 78, naming the key."""
    fed = Federation(tmp_path, free_port(), "http://127.0.0.1:9", rounds=1, silo_procs=(1,),
                     overrides={"common_args": {"shutdown_grace_s": -1}})
    try:
        proc = fed.start("server", 0)
        assert proc.wait(timeout=60) == ExitCode.CONFIG
        assert "common_args.shutdown_grace_s" in fed.log_text("server")
    finally:
        fed.stop()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    """Both units verify cleanly (the ExecStart binary pointed at this checkout's venv, since
    verify checks that it exists); and they carry the settings the README promises."""
    exe = Path(sys.executable).with_name("octopusd")
    assert exe.exists()
    units = []
    for src, dst in (("octopusd-server.service", "octopusd-server.service"),
                     ("octopusd-silo@.service", "octopusd-silo@1.service")):
        text = (ROOT / "systemd" / src).read_text()
        for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure",
                    "RestartPreventExitStatus=2 78 79", "KillMode=mixed", "TimeoutStopSec=",
                    "User=octopusd", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "ReadWritePaths=/var/lib/octopusd /var/log/octopusd",
                    "EnvironmentFile=-/etc/octopusd/secrets.env", "ExecReload=/bin/kill -HUP $MAINPID"):
            assert key in text, (src, key)
        stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
        assert stop > 30, "TimeoutStopSec must exceed the default shutdown_grace_s (30)"
        (tmp_path / dst).write_text(text.replace("/opt/octopusd/venv/bin/octopusd", str(exe)))
        units.append(str(tmp_path / dst))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "octopusd" in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr
