"""Signals: SIGTERM/SIGINT stop a daemon cleanly (exit 0, trainers stopped, "offline" announced,
within the configured grace), a second one forces exit 130 at once, SIGHUP re-reads the log
level and nothing else."""
from __future__ import annotations

import os
import signal
import time

import paho.mqtt.client as paho
import pytest

from octopusd import codec
from octopusd.envelope import Envelope, MsgType, decode_envelope, encode_envelope
from octopusd.testing import Federation
from octopusd.transport import topics

from .helpers import count_events, events, max_diff, metrics, reference_fedavg, silo_pids, wait_for, wait_for_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _publisher(port: int, run_id: str) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{run_id}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _retained(port: int, topic: str, timeout_s: float = 5.0) -> bytes | None:
    got: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: got.append(m.payload) if m.retain else None
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        wait_for(f"retained message on {topic}", lambda: got, timeout_s)
    except TimeoutError:
        return None
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def _stop(proc, sig: int, within_s: float) -> tuple[int, float]:
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=within_s + 5)
    return code, time.monotonic() - t0


def test_sighup_rereads_the_log_level_and_sigterm_stops_the_server(tmp_path, mosquitto, moto_s3):
    """SIGHUP applies OCTOPUSD_LOG_LEVEL from the OCTOPUSD_ENV_FILE file (warning: info lines stop;
    info again: they come back) and the server keeps running; SIGTERM then ends it with 0 fast."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=2)
    env_file = tmp_path / "octopusd.env"
    env_file.write_text("OCTOPUSD_LOG_LEVEL=info\n")
    pub = _publisher(mosquitto.port, fed.run_id)
    online = lambda: encode_envelope(Envelope(type=MsgType.STATUS, run_id=fed.run_id, round=-1,  # noqa: E731
                                              sender=1, body={"state": "online"}))
    try:
        server = fed.start("server", 0, env={"OCTOPUSD_ENV_FILE": str(env_file)})
        wait_for_event(fed, "server", "server_ready", 60)
        pub.publish(topics.silo_status(fed.run_id, 1), online(), qos=1)
        wait_for_event(fed, "server", "waiting_for_silos", 10)       # info: logged

        env_file.write_text("# quieter\nOCTOPUSD_LOG_LEVEL='warning'\n")
        os.kill(server.pid, signal.SIGHUP)
        wait_for_event(fed, "server", "reload", 10, log_level="warning")
        pub.publish(topics.silo_status(fed.run_id, 1), online(), qos=1)
        pub.publish(topics.silo_update(fed.run_id, 1), b"junk", qos=1)  # a warning: our marker
        wait_for_event(fed, "server", "message_rejected", 10)
        assert count_events(fed, "server", "waiting_for_silos") == 1  # the info line was filtered

        env_file.write_text("OCTOPUSD_LOG_LEVEL=info\n")
        os.kill(server.pid, signal.SIGHUP)
        wait_for_event(fed, "server", "reload", 10, log_level="info")
        pub.publish(topics.silo_status(fed.run_id, 1), online(), qos=1)
        wait_for(">1 waiting_for_silos", lambda: count_events(fed, "server", "waiting_for_silos") == 2, 10)
        assert server.poll() is None, "SIGHUP must not stop the daemon"

        code, took = _stop(server, signal.SIGTERM, within_s=5)
        assert code == 0 and took < 5, (code, took, fed.log_text("server")[-2000:])
        status = _retained(mosquitto.port, topics.server_status(fed.run_id))
        assert status is not None and decode_envelope(status).body["state"] == "offline"
    finally:
        pub.disconnect()
        pub.loop_stop()
        fed.stop()


def test_sigint_to_the_server_and_sigterm_to_a_silo_stop_them_cleanly_and_the_run_resumes(
        tmp_path, mosquitto, moto_s3):
    """Mid-run, SIGINT makes the server exit 0 within seconds (its checkpoints survive) and
    SIGTERM makes silo 1 stop its two trainers, publish "offline" and exit 0 within its
    shutdown_grace_s (10), leaving no process behind. Started again, both finish the run, whose
    model equals the uninterrupted run's."""
    rounds = 4
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=rounds, silo_procs=(2, 1),
                     overrides={"common_args": {"shutdown_grace_s": 10}})
    try:
        fed.start_all()
        wait_for("round 0 aggregated", lambda: len(metrics(fed)) >= 1, 150)
        code, took = _stop(fed.procs["server"], signal.SIGINT, within_s=5)
        assert code == 0 and took < 5, (code, took, fed.log_text("server")[-2000:])
        assert (fed.run_dir / "state" / "checkpoint-0").exists()  # round 0 is in slot 0

        assert len(silo_pids(fed, 1)) >= 4   # master, torchrun, two trainers
        code, took = _stop(fed.procs["silo1"], signal.SIGTERM, within_s=10)
        assert code == 0 and took < 10, (code, took, fed.log_text("silo1")[-2000:])
        wait_for("silo 1's trainers gone", lambda: silo_pids(fed, 1) == [], 2)
        status = _retained(mosquitto.port, topics.silo_status(fed.run_id, 1))
        assert status is not None and decode_envelope(status).body["state"] == "offline"
        assert fed.procs["silo2"].poll() is None   # the other silo waits for the server

        fed.start("server", 0)
        fed.start("silo", 1)
        codes = fed.wait_all(timeout_s=150)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert [m["round"] for m in metrics(fed)] == list(range(rounds))
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        assert max_diff(final, reference_fedavg(fed.config, {1: 2, 2: 1}, [{1, 2}] * rounds)) <= 1e-5
        assert fed.stray_pids() == []
    finally:
        fed.stop()


def test_a_second_signal_forces_exit_130_and_kills_the_trainers(tmp_path, mosquitto, moto_s3):
    """SIGTERM while silo 1 is still bringing its trainer group up starts a graceful stop; a
    second SIGTERM ends the process at once with 130, and no trainer survives it."""
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=1, silo_procs=(2,))
    try:
        silo = fed.start("silo", 1)
        wait_for_event(fed, "silo1", "trainer_group_launched", 60)
        wait_for("torchrun and its trainers", lambda: len(silo_pids(fed, 1)) >= 4, 30)
        assert count_events(fed, "silo1", "trainer_group_ready") == 0
        os.kill(silo.pid, signal.SIGTERM)
        wait_for_event(fed, "silo1", "shutdown_requested", 5)
        code, took = _stop(silo, signal.SIGTERM, within_s=2)
        assert code == 130 and took < 2, (code, took, fed.log_text("silo1")[-2000:])
        assert any(e.get("event") == "forced_exit" for e in events(fed, "silo1"))
        wait_for("no orphan trainers", lambda: silo_pids(fed, 1) == [], 5)
    finally:
        fed.stop()
