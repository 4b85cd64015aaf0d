"""Bench model ``mlp``: flatten 28×28, then ReLU hidden layers, then ``output_dim`` logits.

``model_args.hidden_dims`` sets the hidden layer sizes (default ``[3000, 2500]``: the
784-3000-2500-10 MLP of 9.88 M parameters). ``[10000, 9200]`` is ≈ 100 M parameters and
``[16000, 15000]`` ≈ 253 M.
"""
from __future__ import annotations

from torch import nn

from octopusd.hookspecs import hookimpl

INPUT_DIM = 28 * 28


def build_mlp(config, output_dim: int) -> nn.Module:
    hidden = getattr(getattr(config, "model", None), "extra", {}).get("hidden_dims", [3000, 2500])
    dims = [INPUT_DIM, *(int(h) for h in hidden)]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], int(output_dim)))
    return nn.Sequential(*layers)



    dims = [INPUT_DIM, *hidden, output_dim]
    return sum(a * b + b for a, b in zip(dims, dims[1:]))


@hookimpl
def octopus_register_models(register) -> None:
    register.add("mlp", build_mlp, summary="MLP 784-hidden_dims-10 (model_args.hidden_dims) for benchmarks")
