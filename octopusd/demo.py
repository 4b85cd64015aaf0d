"""``octopusd demo``: the whole federation on one machine with no set-up.

Starts an embedded MQTT broker and S3 endpoint on free loopback ports, writes a copy of the seed
config pointing at them, runs the server and the seed's two silos (2 + 1 trainer processes) as
separate processes, shows progress per round from the server's log, prints the final accuracy,
and stops everything — on success, on failure and on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import yaml

from octopusd.embedded import EmbeddedBroker, EmbeddedS3


def seed_config_dir() -> Path:
    """The seed configs: ``etc/`` of a checkout, or the copy shipped in the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "etc", here / "etc"):
        if (candidate / "fedml_config.yaml").exists():
            return candidate
    raise FileNotFoundError("cannot find the seed config (etc/fedml_config.yaml)")


def write_demo_config(src: Path, dest: Path, *, broker: EmbeddedBroker, s3: EmbeddedS3,
                      rounds: int | None, run_id: str) -> Path:
    """Copy the config and its private files into ``dest``, pointed at the embedded services."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.parent.glob("*.yaml"):
        shutil.copy(f, dest / f.name)
    raw = yaml.safe_load(src.read_text())
    raw.setdefault("common_args", {})["run_id"] = run_id
    raw["comm_args"] = {"backend": "MQTT_S3", "BROKER_HOST": broker.host, "BROKER_PORT": broker.port,
                        "MQTT_KEEPALIVE": 30, "BUCKET_NAME": "octopusd-demo", "CN_REGION_NAME": "us-east-1",
                        "CN_S3_ENDPOINT": s3.endpoint_url, "CN_S3_AKI": "demo", "CN_S3_SAK": "demo"}
    raw.setdefault("tracking_args", {})["log_file_dir"] = str(dest / "log")
    if rounds is not None:
        raw.setdefault("train_args", {})["comm_round"] = rounds
    out = dest / src.name
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _follow_server(stream: IO[str], state: dict[str, Any], log_file: IO[str]) -> None:
    for line in stream:
        log_file.write(line)
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("event")
        if ev == "server_ready":
            print(f"data: {rec.get('dataset_source')}", flush=True)
        elif ev == "round_complete":
            state["last"] = rec
            print(f"round {rec['round'] + 1:>3}/{rec['rounds']}  test_acc {rec['test_acc']:.4f}  "
                  f"test_loss {rec['test_loss']:.4f}  silos {rec['silos']}  {rec['round_seconds']:.2f}s",
                  flush=True)
        elif rec.get("level") in ("error", "critical"):
            print(f"server error: {rec.get('event')}: {rec.get('error') or rec.get('reason') or ''}", flush=True)


def _stop_all(procs: list[subprocess.Popen[str]], grace_s: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(*, rounds: int | None = None, config: str | None = None, workdir: str | None = None) -> int:
    src = Path(config).resolve() if config else seed_config_dir() / "fedml_config.yaml"
    tmp = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="octopusd-demo-"))
    broker, s3 = EmbeddedBroker(), EmbeddedS3()
    procs: list[subprocess.Popen[str]] = []
    state: dict[str, Any] = {}
    code = 1
    try:
        broker.start()
        s3.start()
        print(f"embedded MQTT broker on {broker.host}:{broker.port}, S3 endpoint on {s3.endpoint_url}", flush=True)
        cfg = write_demo_config(src, tmp / "config", broker=broker, s3=s3, rounds=rounds,
                                run_id=f"demo-{uuid.uuid4().hex[:8]}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        base = [sys.executable, "-m", "octopusd"]
        logs = tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server = subprocess.Popen(base + ["server", "--cf", str(cfg), "--rank", "0", "--log-format", "json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append(server)
        server_log = open(logs / "server.log", "w")
        follower = threading.Thread(target=_follow_server, args=(server.stdout, state, server_log), daemon=True)
        follower.start()
        for rank in (1, 2):
            out = open(logs / f"silo{rank}.log", "w")
            procs.append(subprocess.Popen(base + ["silo", "--cf", str(cfg), "--rank", str(rank), "--log-format", "json"],
                                          stdout=out, stderr=subprocess.STDOUT, text=True, env=env))
        print(f"server and silos started (silo 1: 2 trainer processes, silo 2: 1); logs in {logs}", flush=True)
        code = server.wait()
        follower.join(timeout=10)
        server_log.close()
        for p in procs[1:]:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        silo_codes = [p.poll() for p in procs[1:]]
        last = state.get("last")
        if code == 0 and last:
            print(f"final test accuracy after {last['round'] + 1} rounds: {last['test_acc']:.4f} "
                  f"(loss {last['test_loss']:.4f})", flush=True)
            print(f"metrics and final model: {tmp / 'config' / 'log'}; logs: {logs}", flush=True)
        else:
            print(f"demo failed: server exit code {code}, silo exit codes {silo_codes}; see {logs}", flush=True)
        if code == 0 and any(c != 0 for c in silo_codes):
            code = 1
        return code
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the server, silos and trainers", flush=True)
        return 130
    finally:
        _stop_all(procs)
        s3.stop()
        broker.stop()
