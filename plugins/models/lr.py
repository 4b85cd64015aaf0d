"""Built-in ``lr`` model: FedML's LogisticRegression, one linear layer over the flat image."""
from __future__ import annotations

import torch
from torch import nn

from octopusd.hookspecs import hookimpl

DEFAULT_INPUT_DIM = 784  # a flattened 28x28 MNIST digit


class LogisticRegression(nn.Module):
    """Flatten, then ``nn.Linear(input_dim, output_dim)``.

    Returns raw logits, unlike FedML's version which applies a sigmoid: the trainer uses
    ``CrossEntropyLoss``, which wants logits.
    """

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, start_dim=1))


def build_lr(config, output_dim: int) -> LogisticRegression:
    """The registered factory; ``model_args.input_dim`` overrides the MNIST default of 784."""
    input_dim = getattr(getattr(config, "model", None), "input_dim", None) or DEFAULT_INPUT_DIM
    return LogisticRegression(int(input_dim), int(output_dim))


@hookimpl
def octopus_register_models(register) -> None:
    register.add("lr", build_lr, summary="logistic regression: one linear layer, raw logits")
