"""CIFAR-10 and CIFAR-100 as distributed (and as torchvision stores them): the python pickles,
read with a restricted unpickler that cannot run code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..images import ArraySource, printable
from .core import DatasetReader, LabelledDataset, LoadOptions, Split

__all__ = ["CIFAR100_DIR", "CIFAR10_DIR", "CIFAR10_TRAIN_FILES", "Cifar100Reader", "Cifar10Reader"]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = ("batches.meta", "test_batch", *CIFAR10_TRAIN_FILES)
_CIFAR100_FILES = ("meta", "train", "test")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that only performs the latin-1 encoding pickle uses."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _numpy_callables() -> dict[tuple[str, str], Any]:
    """The numpy array constructors pickles refer to, under both numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild dicts, lists, strings, bytes, ints and numpy arrays.

    Why this is safe: unpickling runs code only through ``find_class`` (the GLOBAL and
    STACK_GLOBAL opcodes name a callable that REDUCE/NEWOBJ/BUILD then call). Here
    ``find_class`` never imports anything: it returns objects from a fixed table and raises
    ``UnpicklingError`` for every other name, so a file that asks for ``os.system``,
    ``builtins.eval``, ``subprocess.Popen`` etc. is rejected before anything is called.
    The table holds only pure data constructors:

    - ``numpy...multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``: how numpy
      arrays are pickled with protocols 0-4 (the official CIFAR files); they allocate an
      array of a given dtype and shape and fill it from bytes;
    - ``numpy...numeric._frombuffer``: the same for protocol 5 (``np.frombuffer``);
    - ``_codecs.encode``: how Python 3 writes ``bytes`` at protocol <= 2 (replaced by a
      latin-1-only encoder) and ``bytes`` itself (for ``b""``).

    Dicts, lists, tuples, strings and numbers are pickle opcodes and need no globals.
    ``persistent_load`` is left undefined, so persistent ids are rejected as well.
    """

    _allowed: dict[tuple[str, str], Any] = {
        **_numpy_callables(),
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
    }

    def __init__(self, file: io.BufferedIOBase, filename: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.filename = filename

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.filename}: refusing to load {module}.{name}; a CIFAR batch file holds only "
                f"dicts, lists, bytes and numpy arrays (is this file genuine?)"
            ) from None


def _load_cifar_pickle(file: Path) -> dict:
    """Load one CIFAR batch/meta file with the restricted unpickler; it must hold a dict."""
    if not file.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {printable(file)}")
    with open(file, "rb") as handle:
        try:
            data = _CifarUnpickler(handle, file).load()
        except pickle.UnpicklingError:
            raise
        except Exception as error:  # truncated/corrupt files raise EOFError, ValueError, ...
            raise ValueError(f"{printable(file)}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{printable(file)}: expected a dict, found {type(data).__name__}")
    return data


def _get(data: dict, key: str, file: Path) -> Any:
    """``data[b'key']`` (as in the official Python 2 files) or ``data['key']``; ValueError naming the file."""
    for candidate in (key.encode("ascii"), key):
        if candidate in data:
            return data[candidate]
    raise ValueError(f"{printable(file)}: missing key {key!r}")


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _cifar_arrays(file: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,32,32,3) uint8 and labels (N,) int64 of one CIFAR batch file, validated."""
    batch = _load_cifar_pickle(file)
    data = _get(batch, "data", file)
    labels = np.asarray(_get(batch, label_key, file))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{printable(file)}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{printable(file)}: {label_key!r} must hold {len(data)} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{printable(file)}: {label_key!r} values must be in [0, {n_classes})")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _find_cifar_dir(path: Path, folder_name: str, required: Sequence[str]) -> Path | None:
    """``path/folder_name`` (torchvision's root) or ``path`` itself, if it holds the required files."""
    for candidate in (path / folder_name, path):
        if candidate.is_dir() and all((candidate / f).is_file() for f in required):
            return candidate
    return None




class Cifar10Reader(DatasetReader):
    """CIFAR-10 from ``cifar-10-batches-py`` (50,000 train images in five batches, 10,000 test)."""

    name = "cifar10"
    looks_for = f"{CIFAR10_DIR}/ (data_batch_1..5, test_batch, batches.meta)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and _find_cifar_dir(path, CIFAR10_DIR, _CIFAR10_FILES) is not None

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        folder = _find_cifar_dir(path, CIFAR10_DIR, _CIFAR10_FILES)
        if folder is None:
            raise ValueError(
                f"no CIFAR-10 files in {printable(path)}: expected {CIFAR10_DIR}/ with "
                f"{', '.join(CIFAR10_TRAIN_FILES)}, test_batch and batches.meta"
            )
        meta_file = folder / "batches.meta"
        classes = [_as_text(n) for n in _get(_load_cifar_pickle(meta_file), "label_names", meta_file)]
        parts = [_cifar_arrays(folder / f, "labels", len(classes)) for f in CIFAR10_TRAIN_FILES]
        train_images = np.concatenate([images for images, _ in parts])
        train_labels = np.concatenate([labels for _, labels in parts])
        test_images, test_labels = _cifar_arrays(folder / "test_batch", "labels", len(classes))
        return LabelledDataset(
            name="cifar10",
            classes=classes,
            train=Split(ArraySource(train_images), train_labels),
            test=Split(ArraySource(test_images), test_labels),
        )


class Cifar100Reader(DatasetReader):
    """CIFAR-100 from ``cifar-100-python``: 20 coarse super-classes (the paper's protocol) if
    ``options.coarse``, else the 100 fine ones."""

    name = "cifar100"
    looks_for = f"{CIFAR100_DIR}/ (train, test, meta)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and _find_cifar_dir(path, CIFAR100_DIR, _CIFAR100_FILES) is not None

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        folder = _find_cifar_dir(path, CIFAR100_DIR, _CIFAR100_FILES)
        if folder is None:
            raise ValueError(f"no CIFAR-100 files in {printable(path)}: expected {CIFAR100_DIR}/ with train, test and meta")
        kind = "coarse" if options.coarse else "fine"
        meta_file = folder / "meta"
        classes = [_as_text(n) for n in _get(_load_cifar_pickle(meta_file), f"{kind}_label_names", meta_file)]
        train_images, train_labels = _cifar_arrays(folder / "train", f"{kind}_labels", len(classes))
        test_images, test_labels = _cifar_arrays(folder / "test", f"{kind}_labels", len(classes))
        return LabelledDataset(
            name="cifar100" if options.coarse else "cifar100-fine",
            classes=classes,
            train=Split(ArraySource(train_images), train_labels),
            test=Split(ArraySource(test_images), test_labels),
        )
