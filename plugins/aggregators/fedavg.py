"""Built-in aggregator ``FedAvg``: the sample-count-weighted mean of the silos' models."""
from __future__ import annotations

from typing import Mapping

import torch

from octopusd.aggregate import State, add_weighted_, finalize_mean, zeros_like_state
from octopusd.hookspecs import hookimpl


class FedAvg:
    """Streaming FedAvg: Σ nᵢ·xᵢ accumulated as updates arrive, divided by Σ nᵢ at the end."""

    def __init__(self, config: object = None) -> None:
        self._acc: State | None = None
        self._like: Mapping[str, torch.Tensor] = {}
        self._total = 0
        self.round = -1

    def begin_round(self, global_state: Mapping[str, torch.Tensor], round_: int) -> None:
        self._like = global_state
        self._acc = zeros_like_state(global_state)
        self._total = 0
        self.round = round_

    def accumulate(self, update: Mapping[str, torch.Tensor], num_samples: int, sender: int) -> None:
        if self._acc is None:
            raise RuntimeError("accumulate() before begin_round()")
        add_weighted_(self._acc, update, float(num_samples))
        self._total += num_samples

    def finish_round(self) -> State:
        if self._acc is None:
            raise RuntimeError("finish_round() before begin_round()")
        out = finalize_mean(self._acc, float(self._total), self._like)
        self._acc = None
        self._like = {}  # drop the old global now, not at the next begin_round: a model's worth of RSS
        return out

    def state_dict(self) -> dict[str, object]:
        return {"round": self.round}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.round = int(state.get("round", -1))  # type: ignore[arg-type]


@hookimpl
def octopus_register_aggregators(register):
    register.add("FedAvg", FedAvg, summary="sample-count-weighted mean of the silos' models")
