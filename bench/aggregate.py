"""Server-side per-update costs against memcpy of the same size, in the same process and run.

For a model's state (the bench MLPs), single-threaded like the daemons' workload, it times:

* ``memcpy``: ``dst.copy_(src)`` of one flat buffer of the model's size (the yardstick);
* ``accumulate``: FedAvg's ``accumulate`` (the in-place weighted add into the running sum) — the
  aggregation throughput the target compares with memcpy, in bytes of update folded per second;
* for context, the rest of the server's per-update path: ``sha256`` of the payload, ``decode``
  (``codec.decode_state`` with layout and finiteness checks) and ``encode`` of the global.

Each is the median of ``--reps`` timings after a warm-up. One JSON line per model.

    .venv/bin/python bench/aggregate.py --models mlp,mlp100m
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from octopusd import codec  # noqa: E402
from plugins.aggregators.fedavg import FedAvg  # noqa: E402

HIDDEN = {"tiny": [64, 32], "mlp": [3000, 2500], "mlp100m": [10000, 9200], "mlp250m": [15900, 14950]}


def mlp_state(hidden: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [784, *hidden, 10]
    state: dict[str, torch.Tensor] = {}
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        state[f"{2 * i + 1}.weight"] = torch.randn(b, a, generator=g)
        state[f"{2 * i + 1}.bias"] = torch.randn(b, generator=g)
    return state


def timeit(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, reps: int, silos: int) -> dict[str, Any]:
    glob = mlp_state(HIDDEN[name], 0)
    update = mlp_state(HIDDEN[name], 1)
    nbytes = sum(t.numel() * t.element_size() for t in update.values())
    flat_src = torch.empty(nbytes // 4)
    flat_src.normal_()
    flat_dst = torch.empty_like(flat_src)
    t_memcpy = timeit(lambda: flat_dst.copy_(flat_src), reps)

    agg = FedAvg()

    def fold() -> None:  # a whole round's folding: begin, `silos` accumulates, finish
        agg.begin_round(glob, 0)
        for rank in range(1, silos + 1):
            agg.accumulate(update, 500, rank)
        agg.finish_round()

    def fold_only() -> None:
        agg.accumulate(update, 500, 1)

    agg.begin_round(glob, 0)
    t_acc = timeit(fold_only, reps)
    t_round = timeit(fold, reps)
    payload = codec.encode_state(update)
    layout = codec.layout(update)
    t_sha = timeit(lambda: hashlib.sha256(payload).digest(), reps)
    t_dec = timeit(lambda: codec.decode_state(payload, expected=layout, check_finite=True), reps)
    t_enc = timeit(lambda: codec.encode_state(glob), reps)
    gbps = lambda t: round(nbytes / t / 1e9, 2)  # noqa: E731
    return {
        "bench": "aggregate", "model": name, "bytes": nbytes, "threads": torch.get_num_threads(),
        "memcpy_gbps": gbps(t_memcpy), "accumulate_gbps": gbps(t_acc),
        "accumulate_over_memcpy": round(t_memcpy / t_acc, 3),
        "round_fold_s": round(t_round, 4), "round_fold_silos": silos,
        "sha256_gbps": gbps(t_sha), "decode_gbps": gbps(t_dec), "encode_gbps": gbps(t_enc),
        "memcpy_s": round(t_memcpy, 5), "accumulate_s": round(t_acc, 5),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,mlp100m", help=f"comma list of {', '.join(HIDDEN)}")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the daemons' workload uses 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        if name not in HIDDEN:
            p.error(f"unknown model {name!r}; known: {', '.join(HIDDEN)}")
        print(json.dumps(bench_model(name, args.reps, args.silos)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
