"""``dataset, output_dim = octopusd.data.load(args)``: the config's dataset plugin."""
from __future__ import annotations

from typing import Any

from octopusd.plugins import load_plugins


def load(args: Any) -> tuple[Any, int]:
    """The federated dataset object (``train_partition``, ``test_set``, ``source``) and its output size."""
    dataset = load_plugins(args.plugin_dirs).dataset(args.data.dataset)(args)
    return dataset, int(dataset.output_dim)
