"""Silo training throughput through octopusd against a bare torchrun DDP loop, same data.

1. A federation of the server and ``--silos`` silos (``--nproc`` trainer processes each) runs
   ``--rounds + 1`` rounds of the round.py workload (500 random samples per silo, SGD lr 0.01,
   batch 32, one epoch per round, one thread per process).
2. ``bench/bare_ddp.py`` under torchrun, with the same config, silo 1's partition, the same
   model and sampler, runs ``--rounds + 1`` epochs with nothing else running.

Throughput is samples per second of the training loop: the trainers' own ``train_seconds``
(logged by the silo in ``update_sent``) for octopusd, each epoch's wall time for the bare loop;
medians skip the first round/epoch. ``ratio = octopusd / bare`` (the target is ≥ 0.95).
``silo_round_samples_per_s`` is the wider view: samples over the whole round as the silo sees it
(fetch, hand-over to rank 0, training, upload), for information.

    .venv/bin/python bench/trainer.py --model mlp --rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_DIR, ROOT, BenchRun, exit_on_sigterm, median, services  # noqa: E402

MODELS = {"lr": ("lr", {}), "tiny": ("mlp", {"hidden_dims": [64]}), "mlp": ("mlp", {"hidden_dims": [3000, 2500]})}


def octopusd_rounds(args: argparse.Namespace, workdir: Path) -> tuple[Path, list[dict[str, Any]]]:
    plugin, model_args = MODELS[args.model]
    with services(workdir) as (broker, s3):
        run = BenchRun(workdir / "fed", broker, s3, rounds=args.rounds + 1, silos=args.silos, model=plugin,
                       model_args=model_args, data_args={"samples_per_silo": args.samples})
        if args.nproc != 1:
            run.fed.silo_procs = (args.nproc,) * args.silos
            run.fed.__post_init__()
        raw = run.run(timeout_s=args.timeout)
    sent = [e for e in raw["silos"][1] if e.get("event") == "update_sent"]
    starts = {e["round"]: e["t"] for e in raw["server"] if e.get("event") == "round_started"}
    rows = [{"round": e["round"], "train_s": e["train_seconds"], "samples": e["num_samples"],
             "silo_round_s": e["t"] - starts[e["round"]]} for e in sent]
    return run.fed.config, rows


def bare_epochs(cf: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from octopusd.testing import free_port
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                          "--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), str(BENCH_DIR / "bare_ddp.py"), "--cf", str(cf),
                          "--silo", "1", "--epochs", str(args.rounds + 1)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("{")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=10, help="measured rounds/epochs (one more is run)")
    p.add_argument("--silos", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="trainer processes per silo")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="octopusd-bench-trainer-"))
    cf, rows = octopusd_rounds(args, base)
    bare = bare_epochs(cf, args)
    samples = rows[0]["samples"]
    oct_train = median([r["train_s"] for r in rows[1:]] or [r["train_s"] for r in rows])
    oct_round = median([r["silo_round_s"] for r in rows[1:]] or [r["silo_round_s"] for r in rows])
    bare_t = median(bare["epoch_seconds"][1:] or bare["epoch_seconds"])
    print(json.dumps({
        "bench": "trainer", "model": args.model, "silos": args.silos, "nproc": args.nproc, "samples": samples,
        "rounds_measured": max(1, len(rows) - 1),
        "octopusd_train_s": round(oct_train, 4), "bare_epoch_s": round(bare_t, 4),
        "octopusd_samples_per_s": round(samples / oct_train, 1), "bare_samples_per_s": round(samples / bare_t, 1),
        "ratio": round(bare_t / oct_train, 3),
        "silo_round_samples_per_s": round(samples / oct_round, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
