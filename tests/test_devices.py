"""GPU mapping: FedML's gpu_mapping.yaml shape mapped to trainer ranks, validated against WORLD_SIZE."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from octopusd.errors import ConfigError
from octopusd.trainer.devices import rank_to_host_gpu, trainer_device

MAPPING = {"mapping_default": {"node-a": [2, 1], "node-b": [0, 1]}}


def test_ranks_fill_hosts_and_gpus_in_order():
    """Ranks go host by host, GPU by GPU, as many per GPU as the mapping says."""
    assert rank_to_host_gpu(MAPPING, "mapping_default", 4) == [
        ("node-a", 0), ("node-a", 0), ("node-a", 1), ("node-b", 1)]


def test_mapping_must_account_for_world_size():
    """A mapping placing a different number of processes than WORLD_SIZE names both numbers."""
    with pytest.raises(ConfigError, match="places 4 trainer processes but the silo's WORLD_SIZE is 3"):
        rank_to_host_gpu(MAPPING, "mapping_default", 3)


def test_unknown_key_lists_known_keys():
    """An unknown mapping key is a config error listing the keys present."""
    with pytest.raises(ConfigError, match="mapping_default"):
        rank_to_host_gpu(MAPPING, "nope", 4)


@pytest.mark.parametrize("bad", [{"h": "2"}, {"h": [1, -1]}, {"h": [True]}, {}, []])
def test_malformed_mappings_are_config_errors(bad):
    """Counts must be lists of non-negative integers under a non-empty host table."""
    with pytest.raises(ConfigError):
        rank_to_host_gpu({"k": bad}, "k", 1)


def test_cpu_runs_use_the_cpu():
    """using_gpu false: every rank trains on the CPU (gloo)."""
    cfg = SimpleNamespace(device=SimpleNamespace(using_gpu=False))
    assert trainer_device(cfg, 0, 2) == torch.device("cpu")


def test_gpu_requested_without_cuda_is_a_config_error():
    """using_gpu true on a node without CUDA fails clearly instead of falling back silently."""
    if torch.cuda.is_available():
        pytest.skip("this node has CUDA")
    cfg = SimpleNamespace(device=SimpleNamespace(using_gpu=True, gpu_mapping_key="mapping_default",
                                                 gpu_mapping_file="gpu_mapping.yaml"), gpu_mapping=MAPPING)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        trainer_device(cfg, 0, 4)
