"""octopusd: hierarchical cross-silo federated learning daemons over MQTT and S3.

The seed's Python API is available lazily (importing ``octopusd`` stays cheap for the CLI)::

    args = octopusd.init()
    device = octopusd.device.get_device(args)
    dataset, output_dim = octopusd.data.load(args)
    model = octopusd.model.create(args, output_dim)
    octopusd.Client(args, device, dataset, model).run()
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("init", "Client", "Server", "run_hierarchical_cross_silo_server", "run_hierarchical_cross_silo_client")
_MODULES = ("device", "data", "model")


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("octopusd.api"), name)
    if name in _MODULES:
        return importlib.import_module(f"octopusd.{name}")
    raise AttributeError(f"module 'octopusd' has no attribute {name!r}")


__all__ = [*_API, *_MODULES, "__version__"]
