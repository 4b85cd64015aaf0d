"""``model = octopusd.model.create(args, output_dim)``: the config's model plugin, seeded."""
from __future__ import annotations

from typing import Any

import torch

from octopusd.plugins import load_plugins


def create(args: Any, output_dim: int) -> torch.nn.Module:
    """Every party seeds with ``common_args.random_seed`` so all build the same initial model."""
    torch.manual_seed(args.common.random_seed)
    return load_plugins(args.plugin_dirs).model(args.model.model)(args, output_dim)
