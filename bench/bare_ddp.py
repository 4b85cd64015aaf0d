"""A bare torchrun DDP training loop: the yardstick for bench/trainer.py.

Run under torchrun. Same config, dataset partition, model, sampler and optimizer settings as a
silo's trainer group, but none of octopusd: no silo master, no channel, no codec. Rank 0 prints
one JSON line with each epoch's wall time.

    torchrun --nproc_per_node 1 bench/bare_ddp.py --cf CONFIG --silo 1 --epochs 6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from octopusd.config import load_config  # noqa: E402
from octopusd.plugins import load_plugins  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cf", required=True)
    p.add_argument("--silo", type=int, default=1)
    p.add_argument("--epochs", type=int, default=6)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(a.cf, a.silo)
    pm = load_plugins(cfg.plugin_dirs)
    data = pm.dataset(cfg.data.dataset)(cfg)
    part = data.train_partition(a.silo)
    torch.manual_seed(cfg.common.random_seed)
    model = DDP(pm.model(cfg.model.model)(cfg, data.output_dim))
    sampler = DistributedSampler(part, num_replicas=world, rank=rank, shuffle=True, seed=cfg.common.random_seed)
    loader = DataLoader(part, batch_size=cfg.train.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.learning_rate)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"epoch_seconds": times, "samples": len(part), "world_size": world,
                          "threads": torch.get_num_threads(), "pid": os.getpid()}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
