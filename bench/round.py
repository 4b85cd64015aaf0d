"""Round overhead through the real daemons; one JSON line per model on stdout.

Workload (issue 5): 1 server + 2 silos (one trainer process each) on loopback over a real
Mosquitto and a real moto_server, FedAvg, each silo one local epoch of plain SGD (lr 0.01,
batch 32) over 500 random 28×28 samples, every process single-threaded (OMP_NUM_THREADS=1).

A round's time is the wall time between two consecutive ``round_started`` log lines of the
server (so it contains everything: silo fetch, training, upload, server fetch, aggregation,
checkpoint, the next global's encode and upload). The run has ``--rounds + 1`` rounds so that
every measured round has a successor; medians are over rounds 2..--rounds (the first is reported
apart). Training time is the slower silo's ``train_seconds`` of that round (the trainer's own
epoch loop). ``overhead = round − training`` per round, then the median. The server evaluates
only the last round (``--eval-every`` changes that). The transfer floor is measured right after
the run on the same broker and S3 endpoint (see ``bench/floor.py``).

    .venv/bin/python bench/round.py                      # lr, mlp, mlp100m, 20 rounds
    .venv/bin/python bench/round.py --models mlp --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BenchRun, MiB, exit_on_sigterm, median, round_table, services  # noqa: E402
from floor import floor_sync  # noqa: E402

#: name -> (model plugin, model_args)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "lr": ("lr", {}),
    "mlp": ("mlp", {"hidden_dims": [3000, 2500]}),
    "mlp100m": ("mlp", {"hidden_dims": [10000, 9200]}),
    "mlp250m": ("mlp", {"hidden_dims": [15900, 14950]}),
}


def param_count(hidden: list[int], inputs: int = 784, outputs: int = 10) -> int:
    dims = [inputs, *hidden, outputs]
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


def params_of(name: str) -> int:
    plugin, args = MODELS[name]
    return 784 * 10 + 10 if plugin == "lr" else param_count(args["hidden_dims"])


def summarize(name: str, raw: dict[str, Any], rows: list[dict[str, Any]], floor: dict[str, Any],
              silos: int, wall_s: float) -> dict[str, Any]:
    measured = rows[1:] or rows
    rounds = [r["round_s"] for r in measured]
    trains = [r["train_s"] for r in measured]
    overheads = [r["round_s"] - r["train_s"] for r in measured]
    g = rows[0]["global_bytes"]
    ups = rows[0]["update_bytes"]
    model_bytes = params_of(name) * 4
    peak = raw["peak_rss_kib"] * 1024
    idle = raw["idle_rss_kib"] * 1024
    over = median(overheads)
    return {
        "bench": "round", "model": name, "params": params_of(name), "silos": silos,
        "rounds_measured": len(measured),
        "median_round_s": round(median(rounds), 4),
        "median_train_s": round(median(trains), 4),
        "overhead_s": round(over, 4),
        "first_round_s": round(rows[0]["round_s"], 4),
        "first_round_train_s": round(rows[0]["train_s"], 4),
        "server_peak_rss_mb": round(peak / MiB, 1),
        "server_idle_rss_mb": round(idle / MiB, 1),
        "peak_minus_idle_over_model": round((peak - idle) / model_bytes, 2),
        "model_mb": round(model_bytes / MiB, 2),
        "payload_inline": rows[0]["inline"],
        # global: 1 upload + 1 download per silo; each update: 1 upload + 1 download. The
        # checkpoint refers to the next round's global payload: it moves no model bytes.
        "bytes_per_round": g * (1 + silos) + 2 * sum(ups),
        "floor_s": round(floor["floor_s"], 4),
        "floor_down_s": round(floor["floor_down_s"], 4),
        "floor_up_s": round(floor["floor_up_s"], 4),
        "overhead_over_floor": round(over / floor["floor_s"], 2) if floor["floor_s"] > 0 else None,
        "phases_median_s": {k: round(median([r[k] for r in measured]), 4)
                            for k in ("last_update_sent_s", "last_folded_s", "checkpoint_s")},
        "wall_s": round(wall_s, 1),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def run_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plugin, model_args = MODELS[name]
    load_before = round(os.getloadavg()[0], 2)
    with services(workdir) as (broker, s3):
        comm = {"inline_payload_max_bytes": args.inline_max} if args.inline_max is not None else {}
        s3_extra = {k: v for k, v in (("S3_MULTIPART_THRESHOLD", args.multipart_threshold),
                                      ("S3_PART_SIZE", args.part_size),
                                      ("S3_MAX_CONCURRENCY", args.max_concurrency)) if v is not None}
        run = BenchRun(workdir / "fed", broker, s3, rounds=args.rounds + 1, silos=args.silos, model=plugin,
                       model_args=model_args, data_args={"samples_per_silo": args.samples},
                       comm_args=comm, eval_every=args.eval_every, s3_extra=s3_extra)
        t0 = time.monotonic()
        raw = run.run(timeout_s=args.timeout)
        wall = time.monotonic() - t0
        rows = round_table(raw)
        inline_max = args.inline_max if args.inline_max is not None else 256 * 1024
        floor = floor_sync(broker_port=broker.port, s3_endpoint=s3.endpoint_url,
                           global_bytes=rows[0]["global_bytes"], update_bytes=rows[0]["update_bytes"],
                           inline_max=inline_max, reps=args.floor_reps)
    out = summarize(name, raw, rows, floor, args.silos, wall)
    out["load_avg_1m_before"] = load_before
    if s3_extra:
        out["s3_transfer"] = s3_extra
    if args.per_round:
        out["per_round"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lr,mlp,mlp100m", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=20, help="measured rounds (one more is run)")
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--samples", type=int, default=500, help="training samples per silo")
    p.add_argument("--eval-every", type=int, default=0, help="server evaluation every N rounds (0: last only)")
    p.add_argument("--inline-max", type=int, default=None, help="comm_args.inline_payload_max_bytes")
    p.add_argument("--multipart-threshold", type=int, default=None, help="S3_MULTIPART_THRESHOLD (bytes)")
    p.add_argument("--part-size", type=int, default=None, help="S3_PART_SIZE (bytes)")
    p.add_argument("--max-concurrency", type=int, default=None, help="S3_MAX_CONCURRENCY (parts in flight)")
    p.add_argument("--floor-reps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--per-round", action="store_true", help="include the per-round table")
    args = p.parse_args(argv)
    exit_on_sigterm()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="octopusd-bench-round-"))
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        print(json.dumps(run_model(name, args, base / name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
