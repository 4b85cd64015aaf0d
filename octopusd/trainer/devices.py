"""Which device a trainer rank uses: CPU, or a GPU chosen from ``gpu_mapping.yaml``.

FedML's mapping shape is ``{key: {host: [procs_on_gpu0, procs_on_gpu1, ...]}}``: the hosts in
order, each listing how many trainer processes go on each of its GPUs. Ranks are assigned in that
order, so the mapping must account for exactly ``WORLD_SIZE`` processes.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from octopusd.errors import ConfigError


def rank_to_host_gpu(mapping: Mapping[str, Any], key: str, world_size: int,
                     file: str = "gpu_mapping.yaml") -> list[tuple[str, int]]:
    """``[(host, gpu_index)]`` indexed by global trainer rank."""
    if key not in mapping:
        raise ConfigError(f"mapping key {key!r} not found; keys: {', '.join(map(str, mapping))}",
                          file=file, key=key)
    table = mapping[key]
    if not isinstance(table, Mapping) or not table:
        raise ConfigError("expected {host: [processes per GPU, ...]}", file=file, key=key)
    slots: list[tuple[str, int]] = []
    for host, per_gpu in table.items():
        if not isinstance(per_gpu, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                    and n >= 0 for n in per_gpu):
            raise ConfigError(f"expected a list of process counts per GPU, got {per_gpu!r}",
                              file=file, key=f"{key}.{host}")
        for gpu, n in enumerate(per_gpu):
            slots.extend([(str(host), gpu)] * n)
    if len(slots) != world_size:
        raise ConfigError(f"mapping places {len(slots)} trainer processes but the silo's "
                          f"WORLD_SIZE is {world_size} (n_node_in_silo × n_proc_per_node)",
                          file=file, key=key)
    return slots


def trainer_device(cfg: Any, rank: int, world_size: int) -> torch.device:
    if not cfg.device.using_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("using_gpu is true but CUDA is not available on this node",
                          key="device_args.using_gpu")
    if cfg.gpu_mapping is None:
        gpu = rank % torch.cuda.device_count()
    else:
        _, gpu = rank_to_host_gpu(cfg.gpu_mapping, cfg.device.gpu_mapping_key, world_size,
                                  str(cfg.device.gpu_mapping_file))[rank]
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)
