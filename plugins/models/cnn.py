"""Built-in ``cnn`` model: FedML's CNN_DropOut for 1x28x28 digits."""
from __future__ import annotations

import torch
from torch import nn

from octopusd.hookspecs import hookimpl

SIDE = 28


class CnnDropOut(nn.Module):
    """conv 3x3x32, conv 3x3x64, 2x2 max-pool, dropout 0.25, fc 128, dropout 0.5, fc out.

    Same layers and sizes as FedML's ``CNN_DropOut`` (1,199,882 parameters for 10 classes), so
    results are comparable; it returns logits.
    """

    def __init__(self, output_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3), nn.ReLU(),
            nn.MaxPool2d(2, stride=2),
            nn.Dropout(0.25),
        )
        # 28 -> 26 -> 24 after the two unpadded convolutions, 12 after pooling.
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 128), nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flat (n, 784) rows and (n, 28, 28) images come from other loaders; accept them too.
        if x.dim() in (2, 3):
            x = x.reshape(x.shape[0], 1, SIDE, SIDE)
        elif x.dim() != 4:
            raise ValueError(
                f"expected (n, 1, 28, 28), (n, 28, 28) or (n, 784), got {tuple(x.shape)}")
        return self.classifier(self.features(x))


def build_cnn(config, output_dim: int) -> CnnDropOut:
    """The registered factory; the architecture depends only on ``output_dim``."""
    return CnnDropOut(int(output_dim))


@hookimpl
def octopus_register_models(register) -> None:
    register.add("cnn", build_cnn, summary="FedML's CNN_DropOut: two convolutions, 1.2M parameters")
