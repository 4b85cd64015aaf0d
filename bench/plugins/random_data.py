"""Bench dataset ``random``: a fixed number of random 28×28 samples per silo (no files needed).

Sizes come from ``data_args``: ``samples_per_silo`` (default 500) and ``test_samples`` (default
100). Every process derives the same tensors from ``common_args.random_seed`` and the silo rank,
so the data never crosses a process boundary.
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from octopusd.hookspecs import hookimpl

SIDE = 28
NUM_CLASSES = 10


def _samples(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIDE, SIDE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


class RandomFederation:
    output_dim = NUM_CLASSES
    input_shape = (1, SIDE, SIDE)

    def __init__(self, config) -> None:
        extra = config.data.extra
        self.per_silo = int(extra.get("samples_per_silo", 500))
        self.test_samples = int(extra.get("test_samples", 100))
        self.seed = int(config.common.random_seed)
        self.source = f"random: {self.per_silo} samples per silo, {self.test_samples} test samples"

    def train_partition(self, silo_rank: int) -> TensorDataset:
        return _samples(self.per_silo, self.seed * 1_000_003 + int(silo_rank))

    def test_set(self) -> TensorDataset:
        return _samples(self.test_samples, self.seed * 1_000_003)


@hookimpl
def octopus_register_datasets(register) -> None:
    register.add("random", RandomFederation,
                 summary="random 28x28 samples (data_args.samples_per_silo, default 500) for benchmarks")
