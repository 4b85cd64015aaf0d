"""Specification of the built-in ``lr`` and ``cnn`` model plugins (plugins/models/)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
import torch

from octopusd import hookspecs

MODELS = Path(__file__).resolve().parents[1] / "plugins" / "models"


def _load_plugin(name: str):
    # plugins/ is not a package we can rely on, so load the file the way drop-ins are loaded.
    spec = importlib.util.spec_from_file_location(
        f"octopus_test_plugin_{name}", MODELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lr, cnn = _load_plugin("lr"), _load_plugin("cnn")
CONFIG = SimpleNamespace(model=SimpleNamespace())


class FakeRegister:
    def __init__(self):
        self.added = {}

    def add(self, name, factory, *, summary=""):
        self.added[name] = (factory, summary)


def registered_factories():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(lr)
    pm.register(cnn)
    pm.check_pending()
    register = FakeRegister()
    pm.hook.octopus_register_models(register=register)
    return {name: factory for name, (factory, _) in register.added.items()}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_hooks_register_lr_and_cnn_through_pluggy():
    assert set(registered_factories()) == {"lr", "cnn"}


@pytest.mark.parametrize("name", ["lr", "cnn"])
@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (5, 784)])
def test_models_give_one_logit_per_class(name, shape):
    model = registered_factories()[name](CONFIG, 10)
    assert model(torch.rand(shape)).shape == (5, 10)


@pytest.mark.parametrize("name", ["lr", "cnn"])
def test_models_are_deterministic_under_manual_seed(name):
    """Every party builds the same initial weights from the same seed."""
    factory = registered_factories()[name]

    def build(seed):
        torch.manual_seed(seed)
        return factory(CONFIG, 10).state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_lr_has_7850_parameters():
    assert n_params(lr.build_lr(CONFIG, 10)) == 784 * 10 + 10


def test_lr_returns_raw_logits():
    """No sigmoid or softmax: CrossEntropyLoss in the trainer wants logits."""
    model = lr.build_lr(CONFIG, 10)
    x = torch.rand(3, 1, 28, 28)
    expected = x.flatten(1) @ model.linear.weight.T + model.linear.bias
    assert torch.allclose(model(x), expected)


def test_lr_input_dim_comes_from_model_config():
    """``model_args.input_dim`` overrides 784; a config without it (or without .model) gets 784."""
    model = lr.build_lr(SimpleNamespace(model=SimpleNamespace(input_dim=20)), 3)
    assert model(torch.rand(2, 20)).shape == (2, 3)
    assert model.linear.in_features == 20
    unset = SimpleNamespace(model=SimpleNamespace(input_dim=None))
    assert lr.build_lr(unset, 3).linear.in_features == 784
    assert lr.build_lr(object(), 3).linear.in_features == 784


def test_cnn_matches_fedml_cnn_dropout_size():
    assert n_params(cnn.build_cnn(CONFIG, 10)) == 1_199_882


def test_cnn_accepts_unbatched_channel_free_images_and_rejects_other_ranks():
    model = cnn.build_cnn(CONFIG, 62).eval()
    assert model(torch.rand(2, 28, 28)).shape == (2, 62)
    with pytest.raises(ValueError, match="expected"):
        model(torch.rand(28))


def test_cnn_eval_forward_is_deterministic():
    """Dropout is off in eval mode, so the same input gives the same logits."""
    torch.manual_seed(0)
    model = cnn.build_cnn(CONFIG, 10).eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), model(x))
