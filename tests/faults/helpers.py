"""Helpers for the fault tests: read a daemon's JSON log, wait for a log event, find a silo's
processes, and compute the FedAvg a run must produce when some silos miss some rounds."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from octopusd.aggregate import weighted_average
from octopusd.config import load_config
from octopusd.plugins import load_plugins
from octopusd.testing import Federation
from octopusd.trainer.worker import make_optimizer


def events(fed: Federation, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of process ``name`` (non-JSON lines, e.g. torchrun's, are skipped)."""
    out = []
    for line in fed.log_text(name).splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, *, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (tests may poll; daemons never do)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval)


def wait_for_event(fed: Federation, name: str, event: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
    """The first log event ``event`` of ``name`` whose fields match ``fields``."""
    def find() -> dict[str, Any] | None:
        for e in events(fed, name):
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                return e
        return None
    return wait_for(f"{name}: {event} {fields}", find, timeout_s)


def count_events(fed: Federation, name: str, event: str, **fields: Any) -> int:
    return sum(1 for e in events(fed, name)
               if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()))


def metrics(fed: Federation) -> list[dict[str, Any]]:
    path = fed.run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def silo_pids(fed: Federation, rank: int) -> list[int]:
    """Live processes of silo ``rank`` of this run: its master, torchrun and its trainers."""
    pattern = re.compile(rf"--rank {rank}(\s|$)")
    return [pid for pid, cmdline in fed.run_processes() if pattern.search(cmdline)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_fedavg(cfg_path: Path, silo_world_sizes: dict[int, int],
                     participants: list[set[int]]) -> dict[str, torch.Tensor]:
    """In-process FedAvg of DDP training where round ``r`` aggregates only ``participants[r]``.

    Per step, the mean of each rank's gradient; sampler epochs ``r * epochs + e`` (the suite's
    one reference: tests/integration/test_federation.py's covers every silo in every round).
    """
    server_cfg = load_config(cfg_path, 0)
    pm = load_plugins()
    data = pm.dataset(server_cfg.data.dataset)(server_cfg)
    torch.manual_seed(server_cfg.common.random_seed)
    global_model = pm.model(server_cfg.model.model)(server_cfg, data.output_dim)
    state = {k: v.clone() for k, v in global_model.state_dict().items()}
    loss_fn = torch.nn.CrossEntropyLoss()
    for r, who in enumerate(participants):
        updates = []
        for silo in sorted(who):
            world = silo_world_sizes[silo]
            cfg = load_config(cfg_path, silo)
            part = data.train_partition(silo)
            torch.manual_seed(cfg.common.random_seed)
            model = pm.model(cfg.model.model)(cfg, data.output_dim)
            model.load_state_dict(state)
            opt = make_optimizer(cfg, model.parameters())
            samplers = [DistributedSampler(part, num_replicas=world, rank=k, shuffle=True,
                                           seed=cfg.common.random_seed) for k in range(world)]
            for epoch in range(cfg.train.epochs):
                for s in samplers:
                    s.set_epoch(r * cfg.train.epochs + epoch)
                loaders = [DataLoader(part, batch_size=cfg.train.batch_size, sampler=s) for s in samplers]
                for batches in zip(*loaders):
                    opt.zero_grad()
                    grads = None
                    for x, y in batches:
                        model.zero_grad()
                        loss_fn(model(x), y).backward()
                        g = [p.grad.clone() for p in model.parameters()]
                        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
                    for p, g in zip(model.parameters(), grads):
                        p.grad = g / world
                    opt.step()
            updates.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, len(part)))
        state = weighted_average(updates)
    return state


def assert_every_round_trained_exactly(fed: Federation, rounds: int) -> None:
    """Both silos trained every round once, the final model is the uninterrupted FedAvg
    reference (≤ 1e-5), and no process was left behind."""
    from octopusd import codec
    for silo in ("silo1", "silo2"):
        trained = [e["round"] for e in events(fed, silo) if e.get("event") == "trainer_round_done"]
        assert trained == list(range(rounds)), (silo, trained)
    final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
    expected = reference_fedavg(fed.config, {1: 1, 2: 1}, [{1, 2}] * rounds)
    assert max_diff(final, expected) <= 1e-5
    assert fed.stray_pids() == []
