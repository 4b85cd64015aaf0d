"""Lifecycle pieces without a broker: lifecycle settings, sd_notify, log-level reload, forced
exit, and the state-machine rules for offline grace, adopting a round and stale announcements."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import structlog

from octopusd.config import load_config
from octopusd.errors import ConfigError
from octopusd.lifecycle import Lifecycle, lifecycle
from octopusd.notify import Notifier
from octopusd.runtime import log_level_from_env, reload_log_level, set_log_level
from octopusd.server.machine import Ev, Event, State
from octopusd.silo.machine import Ev as SEv, Event as SEvent, SiloMachine, State as SState

from .test_server_machine import collecting, feed, kinds, machine, of_kind, report


# -- lifecycle settings -----------------------------------------------------------------------

def _cfg(tmp_path, **sections):
    raw = {"train_args": {"client_num_in_total": 2, "client_num_per_round": 2}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, 0, run_id="r1", env={})


def test_lifecycle_defaults(tmp_path):
    """Without the keys: 30 s grace, 30 s connect timeout, 30 s offline grace."""
    assert lifecycle(_cfg(tmp_path)) == Lifecycle(30.0, 30.0, 30.0)


def test_lifecycle_reads_the_three_keys_from_their_sections(tmp_path):
    cfg = _cfg(tmp_path, common_args={"shutdown_grace_s": 5}, comm_args={"connect_timeout_s": 2.5},
               train_args={"silo_offline_grace_s": 0})
    assert lifecycle(cfg) == Lifecycle(shutdown_grace_s=5.0, connect_timeout_s=2.5, silo_offline_grace_s=0.0)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("common_args", "shutdown_grace_s", 0), ("common_args", "shutdown_grace_s", "soon"),
    ("comm_args", "connect_timeout_s", -1), ("comm_args", "connect_timeout_s", True),
    ("train_args", "silo_offline_grace_s", -0.5), ("train_args", "silo_offline_grace_s", float("inf")),
])
def test_a_bad_lifecycle_value_names_file_and_key(tmp_path, section, key, value):
    cfg = _cfg(tmp_path, **{section: {key: value}})
    with pytest.raises(ConfigError) as info:
        lifecycle(cfg)
    assert f"{section}.{key}" in str(info.value) and "c.yaml" in str(info.value)


# -- sd_notify --------------------------------------------------------------------------------

def _listener(abstract: bool, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"octopusd-unit-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = f"/tmp/sdn-{uuid.uuid4().hex[:8]}"
    sock.bind(path)
    return sock, path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_ready_status_watchdog_and_stopping(tmp_path, abstract):
    sock, addr = _listener(abstract, tmp_path)
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": addr})
        assert n.enabled
        n.ready("round 1/3")
        n.status("collecting")
        n.watchdog()
        n.stopping()
        got = [sock.recv(1024).decode() for _ in range(4)]
        assert got == ["READY=1\nSTATUS=round 1/3", "STATUS=collecting", "WATCHDOG=1", "STOPPING=1"]
        n.close()
    finally:
        sock.close()
        if not abstract:
            os.unlink(addr)


def test_notifier_without_a_socket_is_a_no_op():
    n = Notifier({})
    assert not n.enabled and n.send("READY=1") is False and n.watchdog_s is None


def test_notifier_ignores_unsupported_addresses_and_a_vanished_socket():
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert n.send("READY=1") is False      # logged once, never raised


def test_watchdog_interval_comes_from_watchdog_usec_for_this_pid_only():
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000"}).watchdog_s == 2.0
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000",
                     "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 2.0
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "0"}).watchdog_s is None


async def test_watchdog_loop_pings_every_half_period(tmp_path):
    sock, addr = _listener(True, tmp_path)
    sock.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(n.watchdog_loop())
    await asyncio.sleep(0.22)
    task.cancel()
    pings = 0
    while True:
        try:
            pings += sock.recv(64) == b"WATCHDOG=1"
        except BlockingIOError:
            break
    sock.close()
    # At 0, 50, 100, 150, 200 ms; fewer on a loaded machine, never more often than every 50 ms.
    assert 2 <= pings <= 6, pings


# -- log level reload (SIGHUP) ----------------------------------------------------------------

def test_log_level_from_env_prefers_the_env_file(tmp_path):
    f = tmp_path / "octopusd.env"
    f.write_text("# comment\n; other comment\nOTHER=1\nOCTOPUSD_LOG_LEVEL=\"Debug\"\n")
    assert log_level_from_env({"OCTOPUSD_LOG_LEVEL": "error", "OCTOPUSD_ENV_FILE": str(f)}) == "debug"
    f.write_text("OTHER=1\n")
    assert log_level_from_env({"OCTOPUSD_LOG_LEVEL": "error", "OCTOPUSD_ENV_FILE": str(f)}) == "error"
    assert log_level_from_env({"OCTOPUSD_ENV_FILE": str(tmp_path / "missing")}) is None
    assert log_level_from_env({}) is None
    with pytest.raises(ValueError, match="loud"):
        log_level_from_env({"OCTOPUSD_LOG_LEVEL": "loud"})


def test_reload_changes_the_configured_level():
    """Loggers are not cached (octopusd.logs), so the new filtering wrapper applies to all."""
    try:
        set_log_level("info")
        assert reload_log_level({"OCTOPUSD_LOG_LEVEL": "error"}) == "error"
        assert structlog.get_config()["wrapper_class"] is structlog.make_filtering_bound_logger(40)
        assert reload_log_level({"OCTOPUSD_LOG_LEVEL": "nonsense"}) is None   # kept, logged
        assert reload_log_level({}) is None
        assert structlog.get_config()["wrapper_class"] is structlog.make_filtering_bound_logger(40)
    finally:
        set_log_level("info")


# -- forced exit ------------------------------------------------------------------------------

_FORCE = textwrap.dedent("""
    import asyncio, os, signal, subprocess, sys
    from octopusd.runtime import Shutdown
    async def main(mode):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        sd = Shutdown(grace_s=0.3 if mode == "grace" else 60)
        sd.install(asyncio.get_running_loop())
        if mode == "grace":
            sd.request()
        else:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.1)
            assert sd.event.is_set()
            os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)       # a shutdown that never finishes
    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.parametrize("mode", ["grace", "second-signal"])
def test_forced_exit_is_130_and_kills_the_children(mode):
    """Past shutdown_grace_s, or on a second SIGTERM/SIGINT: descendants SIGKILLed, exit 130."""
    proc = subprocess.run([sys.executable, "-c", _FORCE, mode], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    child = int(proc.stdout.split()[0])

    def child_alive() -> bool:   # not gone, not a zombie, and not a pid reused by someone else
        try:
            cmdline = open(f"/proc/{child}/cmdline", "rb").read()
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return b"time.sleep(60)" in cmdline and state != "Z"

    # SIGKILL is delivered asynchronously: allow the child a moment to finish dying.
    deadline = time.monotonic() + 5
    while child_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child_alive()
    assert "forced_exit" in proc.stdout


# -- server machine: offline grace, adopting a round ----------------------------------------

def test_a_selected_silo_offline_within_the_grace_keeps_its_place():
    """With offline_grace_s, offline only arms a timer; back online cancels it; the update counts."""
    m, _ = collecting(offline_grace_s=5)
    fx = feed(m, Event(Ev.SILO_OFFLINE, rank=2))
    assert of_kind(fx, "set_timer")[0].args == {"name": "offline:2", "delay": 5, "round": 0}
    assert m.selected == (1, 2) and m.suspect == {2}
    fx = feed(m, Event(Ev.SILO_ONLINE, rank=2))
    assert of_kind(fx, "cancel_timer")[0].args["name"] == "offline:2"
    report(m, 1)
    fx = report(m, 2)
    assert "aggregate" in kinds(fx) and of_kind(fx, "aggregate")[0].args["silos"] == (1, 2)


def test_a_silo_still_offline_when_the_grace_ends_is_dropped():
    m, _ = collecting(offline_grace_s=5)
    report(m, 1)
    feed(m, Event(Ev.SILO_OFFLINE, rank=2))
    fx = feed(m, Event(Ev.TIMER, name="offline:2", round=0))
    assert of_kind(fx, "aggregate")[0].args["silos"] == (1,)


def test_an_offline_timer_after_the_silo_came_back_is_ignored():
    m, _ = collecting(offline_grace_s=5)
    feed(m, Event(Ev.SILO_OFFLINE, rank=2))
    feed(m, Event(Ev.SILO_ONLINE, rank=2))
    fx = feed(m, Event(Ev.TIMER, name="offline:2", round=0))
    assert kinds(fx, all_=True) == ["drop"] and m.selected == (1, 2)


def test_resume_collect_adopts_the_announced_round():
    """A restarted server collects the round its predecessor announced, with that selection."""
    m = machine(comm_round=3)
    fx = m.resume_collect(1, (2, 1, 9))     # 9 is no silo of this run
    assert m.state is State.COLLECT and m.round == 1 and m.selected == (1, 2)
    assert [f.args["name"] for f in of_kind(fx, "set_timer")] == ["deadline", "give_up"]
    report(m, 2)
    fx = report(m, 1)
    assert of_kind(fx, "aggregate")[0].args == {"round": 1, "silos": (1, 2)}


def test_resume_collect_without_valid_ranks_waits_for_silos():
    m = machine()
    m.resume_collect(0, (7,))
    assert m.state is State.WAIT_SILOS and m.round == 0


# -- silo machine: announcements of closed rounds ---------------------------------------------

def _idle() -> SiloMachine:
    m = SiloMachine(1)
    m.start()
    return m


def test_a_restarted_silo_skips_rounds_closed_while_it_was_down():
    """Queued announcements replayed at start: only a round not older than the newest one runs."""
    m = _idle()   # STARTING: announcements are queued
    m.handle(SEvent(SEv.ROUND_START, round=2, selected=(1, 2), token="a"))
    m.handle(SEvent(SEv.ROUND_START, round=3, selected=(2,), token="b"))   # round 2 is over
    fx = m.handle(SEvent(SEv.GROUP_READY))
    assert [f.kind for f in fx] == ["publish_status"] and m.state is SState.IDLE
    fx = m.handle(SEvent(SEv.ROUND_START, round=2, selected=(1, 2), token="late copy"))
    assert [f.kind for f in fx] == ["drop"] and fx[0].args["reason"] == "a newer round was announced"
    fx = m.handle(SEvent(SEv.ROUND_START, round=4, selected=(1, 2), token="c"))
    assert [f.kind for f in fx] == ["fetch_global"]
