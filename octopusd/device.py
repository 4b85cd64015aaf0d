"""``octopusd.device.get_device(args)``: the device this process should compute on."""
from __future__ import annotations

import os
from typing import Any

import torch

from octopusd.trainer.devices import trainer_device


def get_device(args: Any) -> torch.device:
    """Inside a trainer, its rank's GPU from gpu_mapping.yaml (or the CPU); elsewhere CPU or cuda:0."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return trainer_device(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if args.device.using_gpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")
