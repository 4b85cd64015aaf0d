"""Aggregation math: pure functions over tensors, and the streaming aggregator contract.

Updates are folded into a running sum as they arrive, so the server holds one accumulator and
one decoded update at a time, whatever the number of silos.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import torch

State = dict[str, torch.Tensor]


class Aggregator(Protocol):
    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_: int) -> None: ...
    def accumulate(self, update: Mapping[str, torch.Tensor], num_samples: int, sender: int) -> None: ...
    def finish_round(self) -> State: ...
    def state_dict(self) -> dict[str, object]: ...
    def load_state_dict(self, state: Mapping[str, object]) -> None: ...


def zeros_like_state(state: Mapping[str, torch.Tensor]) -> State:
    """Float accumulators for floating tensors; integer tensors are taken from the first update."""
    return {k: torch.zeros_like(v, dtype=v.dtype if v.is_floating_point() else torch.float64)
            for k, v in state.items()}


def add_weighted_(acc: State, update: Mapping[str, torch.Tensor], weight: float) -> None:
    """``acc += weight * update`` in place, tensor by tensor."""
    for name, total in acc.items():
        src = update[name]
        if src.dtype == total.dtype:
            total.add_(src, alpha=weight)
        else:
            total.add_(src.to(total.dtype), alpha=weight)


def finalize_mean(acc: State, total_weight: float, like: Mapping[str, torch.Tensor]) -> State:
    """``acc / total_weight`` cast back to each tensor's original dtype."""
    if total_weight <= 0:
        raise ValueError("cannot average zero updates")
    out: State = {}
    for name, total in acc.items():
        mean = total.div_(total_weight)
        ref = like[name]
        out[name] = mean if mean.dtype == ref.dtype else mean.round().to(ref.dtype) \
            if not ref.is_floating_point() else mean.to(ref.dtype)
    return out


def weighted_average(updates: list[tuple[Mapping[str, torch.Tensor], int]]) -> State:
    """Reference (non-streaming) FedAvg: Σ nᵢ·xᵢ / Σ nᵢ."""
    acc = zeros_like_state(updates[0][0])
    total = 0
    for state, n in updates:
        add_weighted_(acc, state, float(n))
        total += n
    return finalize_mean(acc, float(total), updates[0][0])
