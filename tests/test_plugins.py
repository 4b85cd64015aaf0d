"""Specification of plugin loading (octopusd/plugins.py): built-ins, drop-ins, entry points."""
from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from octopusd import plugins as plugins_mod
from octopusd.errors import ExitCode, PluginError, UnknownPluginError
from octopusd.plugins import load_plugins

BUILTINS = {
    "aggregator": {"FedAvg"},
    "dataset": {"mnist"},
    "model": {"lr", "cnn"},
    "launcher": {"torchrun"},
}


@pytest.fixture(scope="module")
def builtin_pm():
    return load_plugins(entry_points=False)


def write_plugin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text("from octopusd.hookspecs import hookimpl\n\n" + textwrap.dedent(body))
    return path


def aggregator_plugin(folder: Path, file: str, *names: str) -> Path:
    """A drop-in registering each name as an aggregator whose factory returns that name."""
    lines = ["@hookimpl", "def octopus_register_aggregators(register):"]
    lines += [f"    register.add({n!r}, lambda config: {n!r}, summary='test')" for n in names]
    return write_plugin(folder, file, "\n".join(lines) + "\n")


def fake_distribution(root: Path, module: str, body: str, ep_name: str = "fakeplug") -> None:
    """An installed distribution 'fakeplug' whose octopusd entry point is ``module``."""
    info = root / "fakeplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[octopusd]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(
        "from octopusd.hookspecs import hookimpl\n\n" + textwrap.dedent(body))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on sys.path for fake distributions; their modules are unloaded after."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.startswith("fakeplug"):
            del sys.modules[name]


def origins(pm, kind: str) -> dict[str, str]:
    return {e.name: e.origin for e in pm.registries[kind].entries()}


# -- built-ins -------------------------------------------------------------------------------------

def test_builtins_are_registered_from_the_plugins_directory(builtin_pm):
    """load_plugins() registers FedAvg, mnist, lr, cnn and torchrun from plugins/."""
    for kind, names in BUILTINS.items():
        assert names <= set(builtin_pm.registries[kind].names()), kind
        for name in names:
            assert origins(builtin_pm, kind)[name].startswith("builtin:")


def test_builtins_are_loaded_from_the_repository_plugins_folder():
    """In a checkout the built-in directory is plugins/ at the repository root."""
    assert plugins_mod.builtin_plugin_dir().resolve() == \
        (Path(__file__).resolve().parents[1] / "plugins").resolve()


def test_fedavg_is_the_sample_weighted_mean(builtin_pm):
    """FedAvg of two states with 1 and 3 samples equals (1·a + 3·b) / 4, tensor by tensor."""
    agg = builtin_pm.aggregator("FedAvg")(None)
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    agg.begin_round({k: torch.zeros_like(v) for k, v in a.items()}, 0)
    agg.accumulate(a, 1, sender=1)
    agg.accumulate(b, 3, sender=2)
    out = agg.finish_round()
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))


def _write_idx(folder: Path, name: str, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (folder / name).write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_factory_builds_a_federation_with_ten_classes(builtin_pm, tmp_path):
    """The mnist factory reads IDX files from data_cache_dir and reports output_dim 10."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path, f"{split}-images-idx3-ubyte", 0x803, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path, f"{split}-labels-idx1-ubyte", 0x801, np.arange(n) % 10)
    config = SimpleNamespace(
        data=SimpleNamespace(data_cache_dir=tmp_path, partition_method="homo", partition_alpha=0.5),
        common=SimpleNamespace(random_seed=0), train=SimpleNamespace(client_num_in_total=2))
    dataset = builtin_pm.dataset("mnist")(config)
    assert dataset.output_dim == 10
    assert len(dataset.train_partition(1)) + len(dataset.train_partition(2)) == 40
    assert len(dataset.test_set()) == 10


def test_lr_model_maps_images_to_class_logits(builtin_pm):
    """The lr factory builds a module mapping (n, 1, 28, 28) images to (n, output_dim) logits."""
    model = builtin_pm.model("lr")(SimpleNamespace(model=SimpleNamespace(input_dim=None)), 10)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_torchrun_launcher_constructs(builtin_pm):
    """The torchrun factory returns a launcher whose start() is a coroutine function."""
    config = SimpleNamespace()
    launcher = builtin_pm.launcher("torchrun")(config)
    assert launcher.config is config
    assert inspect.iscoroutinefunction(launcher.start)


@pytest.mark.parametrize("kind", list(BUILTINS))
def test_unknown_names_fail_listing_the_known_ones(builtin_pm, kind):
    """Looking up an unregistered name raises UnknownPluginError naming every registered one."""
    with pytest.raises(UnknownPluginError) as info:
        getattr(builtin_pm, kind)("NoSuchThing")
    message = str(info.value)
    assert "NoSuchThing" in message
    for name in BUILTINS[kind]:
        assert name in message
    assert info.value.known == builtin_pm.registries[kind].names()
    assert info.value.exit_code == ExitCode.PLUGIN


# -- drop-in directories ---------------------------------------------------------------------------

def test_a_dropin_aggregator_is_picked_up_by_name(tmp_path):
    """A *.py file in a plugin_dirs folder registers its aggregator under its name."""
    path = aggregator_plugin(tmp_path / "dropins", "mine", "MyAgg")
    pm = load_plugins([tmp_path / "dropins"], entry_points=False)
    assert pm.aggregator("MyAgg")(None) == "MyAgg"
    assert origins(pm, "aggregator")["MyAgg"] == f"dropin:{path}"
    assert origins(pm, "aggregator")["FedAvg"].startswith("builtin:"), "built-ins stay registered"


def test_a_dropin_can_override_a_builtin_name(tmp_path):
    """A drop-in registering 'FedAvg' replaces the built-in FedAvg."""
    aggregator_plugin(tmp_path / "dropins", "override", "FedAvg")
    pm = load_plugins([tmp_path / "dropins"], entry_points=False)
    assert pm.aggregator("FedAvg")(None) == "FedAvg"
    assert origins(pm, "aggregator")["FedAvg"].startswith("dropin:")


def test_a_dropin_may_implement_every_hook(tmp_path):
    """One drop-in file can register an aggregator, a dataset, a model and a launcher."""
    path = write_plugin(tmp_path / "dropins", "everything", """
        @hookimpl
        def octopus_register_aggregators(register):
            register.add("AllAgg", dict)

        @hookimpl
        def octopus_register_datasets(register):
            register.add("all-data", dict)

        @hookimpl
        def octopus_register_models(register):
            register.add("all-model", dict)

        @hookimpl
        def octopus_register_launchers(register):
            register.add("all-launcher", dict)
        """)
    pm = load_plugins([tmp_path / "dropins"], entry_points=False)
    for kind, name in (("aggregator", "AllAgg"), ("dataset", "all-data"), ("model", "all-model"),
                       ("launcher", "all-launcher")):
        assert getattr(pm, kind)(name) is dict
        assert origins(pm, kind)[name] == f"dropin:{path}"


def test_dropin_directories_load_in_the_order_listed(tmp_path):
    """With two directories registering the same name, the later directory wins."""
    aggregator_plugin(tmp_path / "first", "a", "Same")
    second = aggregator_plugin(tmp_path / "second", "b", "Same")
    pm = load_plugins([tmp_path / "first", tmp_path / "second"], entry_points=False)
    assert origins(pm, "aggregator")["Same"] == f"dropin:{second}"


def test_underscore_files_in_a_dropin_directory_are_ignored(tmp_path):
    """Files whose name starts with '_' (helpers, __init__.py) are not loaded as plugins."""
    aggregator_plugin(tmp_path / "dropins", "_helper", "Hidden")
    pm = load_plugins([tmp_path / "dropins"], entry_points=False)
    assert "Hidden" not in pm.registries["aggregator"].names()


def test_a_misspelt_hook_name_fails_the_pending_check(tmp_path):
    """A hookimpl for a hook that does not exist fails load_plugins() with PluginError."""
    write_plugin(tmp_path / "dropins", "typo", """
        @hookimpl
        def octopus_register_aggregator(register):
            register.add("Typo", object)
        """)
    with pytest.raises(PluginError, match="octopus_register_aggregator"):
        load_plugins([tmp_path / "dropins"], entry_points=False)


def test_a_hookimpl_with_wrong_parameters_fails_with_plugin_error(tmp_path):
    """A hookimpl whose parameter names do not match the spec fails with PluginError."""
    path = write_plugin(tmp_path / "dropins", "badargs", """
        @hookimpl
        def octopus_register_models(registry):
            pass
        """)
    with pytest.raises(PluginError) as info:
        load_plugins([tmp_path / "dropins"], entry_points=False)
    assert str(path) in str(info.value) and "registry" in str(info.value)


def test_a_dropin_that_raises_on_import_names_the_file(tmp_path):
    """An exception while importing a drop-in becomes a PluginError naming the file."""
    path = write_plugin(tmp_path / "dropins", "broken", "raise RuntimeError('boom at import')\n")
    with pytest.raises(PluginError) as info:
        load_plugins([tmp_path / "dropins"], entry_points=False)
    assert str(path) in str(info.value) and "boom at import" in str(info.value)
    assert info.value.exit_code == ExitCode.PLUGIN


def test_a_missing_plugin_directory_fails_clearly(tmp_path):
    """A plugin_dirs entry that does not exist fails with PluginError naming it."""
    missing = tmp_path / "nowhere"
    with pytest.raises(PluginError) as info:
        load_plugins([missing], entry_points=False)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_registering_a_non_callable_factory_fails(tmp_path):
    """register.add() with a factory that is not callable fails with PluginError."""
    write_plugin(tmp_path / "dropins", "notcallable", """
        @hookimpl
        def octopus_register_launchers(register):
            register.add("weird", 42)
        """)
    with pytest.raises(PluginError, match="not callable"):
        load_plugins([tmp_path / "dropins"], entry_points=False)


def test_each_load_builds_an_independent_manager(tmp_path):
    """A drop-in loaded by one load_plugins() call does not leak into another call's registry."""
    aggregator_plugin(tmp_path / "dropins", "leak", "Leaky")
    load_plugins([tmp_path / "dropins"], entry_points=False)
    assert "Leaky" not in load_plugins(entry_points=False).registries["aggregator"].names()


# -- entry points ----------------------------------------------------------------------------------

def test_an_entry_point_aggregator_is_registered(site):
    """An installed distribution's octopusd entry point registers with origin 'entrypoint:<name>'."""
    fake_distribution(site, "fakeplug_agg", """
        @hookimpl
        def octopus_register_aggregators(register):
            register.add("FakeAgg", lambda config: "fake")
        """)
    pm = load_plugins()
    assert pm.aggregator("FakeAgg")(None) == "fake"
    assert origins(pm, "aggregator")["FakeAgg"] == "entrypoint:fakeplug"


def test_an_entry_point_that_fails_to_load_raises_plugin_error(site):
    """An entry point whose module raises on import fails with PluginError naming the entry point."""
    fake_distribution(site, "fakeplug_broken", "raise ImportError('missing dependency')\n")
    with pytest.raises(PluginError, match="fakeplug.*missing dependency"):
        load_plugins()


def test_entry_points_can_be_turned_off(site):
    """load_plugins(entry_points=False) ignores installed distributions."""
    fake_distribution(site, "fakeplug_off", """
        @hookimpl
        def octopus_register_aggregators(register):
            register.add("OffAgg", object)
        """)
    assert "OffAgg" not in load_plugins(entry_points=False).registries["aggregator"].names()


def test_loading_order_is_builtin_then_dropin_then_entrypoint(tmp_path, site):
    """Later sources override earlier ones: built-in < drop-in < entry point, as origins show."""
    aggregator_plugin(tmp_path / "dropins", "order", "FedAvg", "Shared")
    fake_distribution(site, "fakeplug_order", """
        @hookimpl
        def octopus_register_aggregators(register):
            register.add("Shared", lambda config: "from entry point")
        """)
    pm = load_plugins([tmp_path / "dropins"])
    got = origins(pm, "aggregator")
    assert got["FedAvg"].startswith("dropin:")
    assert got["Shared"] == "entrypoint:fakeplug"
    assert pm.aggregator("Shared")(None) == "from entry point"
    assert origins(pm, "model")["lr"].startswith("builtin:")
