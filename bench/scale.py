"""Scale: one server and N protocol-complete silo masters with a null trainer, packed into a few
processes; one JSON line per N.

Each silo master is the real :class:`~octopusd.silo.daemon.SiloDaemon` (state machine, its own
MQTT connection with last-will, its own S3 client, digest checks, the local channel to its
"rank 0") with the ``null`` launcher plugin of ``bench/plugins/null_trainer.py``: rank 0 is an
asyncio task in the same process that returns the global model plus a deterministic perturbation,
so rounds cost only the protocol. ``--procs`` processes each run N/procs silo masters on one
event loop. The server is the real ``octopusd server`` process. The model is a 784-128-10 MLP
(101,770 parameters, 407 KB: above the 256 KiB inline threshold, so payloads go through S3).

Reported: median round time (= overhead: nothing trains) over rounds 2..--rounds, the first
round, server CPU seconds per round and per silo (from the kernel's accounting: CPU after
``server_ready`` until exit, divided by rounds × N), server and silo-process peak RSS.

    .venv/bin/python bench/scale.py --silos 10,100,1000 --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (PLUGIN_DIR, ROOT, MiB, cpu_seconds, exit_on_sigterm, median,  # noqa: E402
                     memory_guard, proc_status_kib, read_events, services, wait_for_event, wait_rusage)

HIDDEN = [128]


def write_config(workdir: Path, broker_port: int, s3: str, silos: int, rounds: int,
                 inline_max: int | None) -> Path:
    import yaml
    comm: dict[str, Any] = {"backend": "MQTT_S3", "BROKER_HOST": "127.0.0.1", "BROKER_PORT": broker_port,
                            "MQTT_KEEPALIVE": 60, "BUCKET_NAME": "octopusd-scale", "CN_REGION_NAME": "us-east-1",
                            "CN_S3_ENDPOINT": s3, "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"}
    if inline_max is not None:
        comm["inline_payload_max_bytes"] = inline_max
    raw = {
        "common_args": {"random_seed": 0, "run_id": f"scale-{silos}-{os.getpid()}"},
        "data_args": {"dataset": "random", "samples_per_silo": 500, "test_samples": 100},
        "model_args": {"model": "mlp", "hidden_dims": HIDDEN},
        "train_args": {"federated_optimizer": "FedAvg", "client_num_in_total": silos,
                       "client_num_per_round": silos, "comm_round": rounds, "epochs": 1, "batch_size": 32,
                       "client_optimizer": "sgd", "learning_rate": 0.01, "silo_wait_timeout_s": 600},
        "validation_args": {"frequency_of_the_test": rounds + 1},
        "comm_args": comm,
        "tracking_args": {"log_file_dir": str(workdir / "log")},
        "dist_training_args": {"launcher": "null", "n_node_in_silo": 1, "n_proc_per_node": 1},
        "plugin_dirs": [str(PLUGIN_DIR)],
    }
    path = workdir / "scale.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ worker process
async def run_silos(cf: str, ranks: list[int]) -> int:
    from octopusd.config import load_config
    from octopusd.plugins import load_plugins
    from octopusd.runtime import Shutdown
    from octopusd.silo.daemon import SiloDaemon

    first = load_config(cf, ranks[0])
    pm = load_plugins(first.plugin_dirs)
    daemons = [SiloDaemon(load_config(cf, r), plugins=pm, shutdown=Shutdown()) for r in ranks]
    codes = await asyncio.gather(*(d.run() for d in daemons), return_exceptions=True)
    bad = [(r, c) for r, c in zip(ranks, codes) if c != 0]
    if bad:
        print(json.dumps({"event": "scale_worker_failures", "failures": [[r, repr(c)] for r, c in bad[:5]],
                          "count": len(bad)}), flush=True)
    return 1 if bad else 0


def worker_main(cf: str, first: int, last: int) -> int:
    from octopusd.logs import configure_logging
    configure_logging("warning", json=True)  # 1,000 silos' info lines would cost the bench itself
    return asyncio.run(run_silos(cf, list(range(first, last + 1))))


# ------------------------------------------------------------------------------------ driver
def run_scale(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with services(workdir) as (broker, s3):
        cf = write_config(workdir, broker.port, s3.endpoint_url, n, args.rounds + 1, args.inline_max)
        server_log = workdir / "server.log"
        server = subprocess.Popen([sys.executable, "-m", "octopusd", "server", "--cf", str(cf), "--rank", "0",
                                   "--log-format", "json"], stdout=open(server_log, "wb"),
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
        workers: list[subprocess.Popen[bytes]] = []
        try:
            wait_for_event(server_log, "server_ready", server, 120)
            cpu_ready = cpu_seconds(server.pid) or 0.0
            procs = max(1, min(args.procs, n))
            per = -(-n // procs)
            t_start = time.monotonic()
            for i in range(procs):
                a, b = 1 + i * per, min(n, (i + 1) * per)
                if a > b:
                    break
                workers.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", str(cf), str(a), str(b)],
                    stdout=open(workdir / f"silos-{a}-{b}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, cwd=ROOT))
            silo_hwm: dict[int, int] = {}

            def sample() -> None:
                memory_guard()
                for w in workers:
                    v = proc_status_kib(w.pid, "VmHWM")
                    if v:
                        silo_hwm[w.pid] = max(silo_hwm.get(w.pid, 0), v)
            end = wait_rusage(server, args.timeout, workers, on_poll=sample)
            if end.code != 0:
                raise RuntimeError(f"server exited with {end.code}: {server_log.read_text()[-3000:]}")
            wall = time.monotonic() - t_start
            for w in workers:
                w.wait(120)
        finally:
            for p in [server, *workers]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    events = read_events(server_log)
    starts = {e["round"]: e["t"] for e in events if e.get("event") == "round_started"}
    ready = next(e["t"] for e in events if e.get("event") == "server_ready")
    rounds = [starts[r + 1] - starts[r] for r in sorted(starts) if r + 1 in starts]
    cpu_rounds = end.cpu_s - cpu_ready
    peak = end.peak_rss_kib
    measured = rounds[1:] or rounds
    model_bytes = (784 * 128 + 128 + 128 * 10 + 10) * 4
    return {
        "bench": "scale", "silos": n, "procs": len(workers), "rounds_measured": len(measured),
        "params": model_bytes // 4, "payload_bytes": next((e.get("payload_bytes") for e in events
                                                            if e.get("event") == "round_started"), None),
        "median_round_s": round(median(measured), 4) if measured else None,
        "first_round_s": round(rounds[0], 4) if rounds else None,
        "all_online_s": round(starts[0] - ready, 2) if 0 in starts else None,
        "server_cpu_s": round(cpu_rounds, 2),
        "server_cpu_ms_per_silo_round": round(1000 * cpu_rounds / (n * (args.rounds + 1)), 3),
        "server_peak_rss_mb": round(peak * 1024 / MiB, 1) if peak else None,
        "silo_proc_peak_rss_mb": round(max(silo_hwm.values(), default=0) * 1024 / MiB, 1),
        "silo_rss_mb_per_silo": round(sum(silo_hwm.values()) * 1024 / MiB / n, 2),
        "wall_s": round(wall, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv[1], int(argv[2]), int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silos", default="10,100,1000", help="comma list of N")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (one more is run)")
    p.add_argument("--procs", type=int, default=4, help="processes the silo masters are packed into")
    p.add_argument("--inline-max", type=int, default=None, help="comm_args.inline_payload_max_bytes")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="octopusd-bench-scale-"))
    for n in (int(x) for x in args.silos.split(",")):
        print(json.dumps(run_scale(n, args, base / f"n{n}")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
