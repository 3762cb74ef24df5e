"""Labelled dataset readers for the benchmark protocols.

The DN2 paper evaluates on labelled classification datasets (CIFAR-10, CIFAR-100 with its 20
coarse super-classes, Fashion-MNIST, ...): one class is "normal", the others are anomalies. This
module turns the common on-disk forms of such datasets into one small structure, a
:class:`LabelledDataset` holding a train and a test :class:`Split`, each an image source (see
:mod:`dn2.images`) plus one integer class label per image.

Supported forms (``load_dataset(path, format="auto")`` detects them from what is at ``path``):

- ``"folder"``: ``train/<class>/...`` and ``test/<class>/...``, or only ``<class>/...`` (then split
  per class by ``seed`` into train/test, deterministic and stratified);
- ``"zip"``: a zip archive with the same layout, optionally under one top-level folder, read in
  place (no unpacking);
- ``"cifar10"`` / ``"cifar100"``: the python pickles as distributed (and as torchvision stores
  them), read with a restricted unpickler that cannot run code;
- ``"mnist"`` / ``"fashion-mnist"`` (alias ``"idx"``): the idx files, raw or gzipped;
- ``"csv"``: a manifest ``path,label[,split]``.

Nothing here downloads anything: benchmarks run on files the user already has.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .images import IMAGE_EXTENSIONS, ArraySource, FileSource, ImageSource, ZipSource, list_image_files

__all__ = [
    "Split",
    "LabelledDataset",
    "SubsetSource",
    "load_dataset",
    "subset",
    "describe",
    "read_idx",
    "FORMATS",
]

PathLike = str | os.PathLike

#: Accepted values of ``load_dataset(format=...)``.
FORMATS = ("auto", "folder", "zip", "cifar10", "cifar100", "mnist", "fashion-mnist", "idx", "csv")

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# Folder names never treated as classes (hidden folders, macOS zip debris).
_IGNORED_DIR_NAMES = {"__MACOSX"}


# ---------------------------------------------------------------------------------------------
# Data structures
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    """The images of one split and their class indices (``labels[i]`` belongs to ``source[i]``)."""

    source: ImageSource
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.source):
            raise ValueError(f"Split has {len(self.source)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LabelledDataset:
    """A named labelled dataset: class names (index = label value) and a train and test split."""

    name: str
    classes: list[str]
    train: Split
    test: Split


class SubsetSource(ImageSource):
    """A view of some images of another source, in the given order, keeping their names.

    Used by the protocols to select e.g. the training images of the normal class without
    copying or re-reading anything. Subsets of subsets are flattened to one level.
    """

    def __init__(self, base: ImageSource, indices: Sequence[int] | np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(base, SubsetSource):
            indices = base.indices[indices]
            base = base.base
        self.base = base
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.base.name(int(self.indices[i]))

    def load(self, i: int, max_side: int | None = None):
        return self.base.load(int(self.indices[i]), max_side=max_side)

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def fingerprint(self) -> str:
        """The base source's fingerprint and the indices."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(self.base.fingerprint().encode())
        h.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()


def subset(split: Split, indices: Iterable[int] | np.ndarray) -> Split:
    """Return a view of ``split`` holding only the images at ``indices`` (ints or a boolean mask)."""
    indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
    if indices.dtype == bool:
        if len(indices) != len(split):
            raise ValueError(f"boolean mask has length {len(indices)}, split has {len(split)} images")
        indices = np.flatnonzero(indices)
    if indices.size == 0:
        indices = indices.astype(np.int64)
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"subset indices must be integers or a boolean mask, got dtype {indices.dtype}")
    indices = indices.astype(np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(split)):
        raise IndexError(f"subset indices must be in [0, {len(split)}), got {indices.min()}..{indices.max()}")
    return Split(source=SubsetSource(split.source, indices), labels=split.labels[indices])


def describe(ds: LabelledDataset) -> str:
    """One-line summary: name, number of classes, images per split (with per-class range)."""
    parts = [f"{ds.name}: {len(ds.classes)} classes"]
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        counts = np.bincount(split.labels, minlength=len(ds.classes))
        per_class = f"{counts.min():,}-{counts.max():,}" if counts.size else "0"
        parts.append(f"{split_name} {len(split):,} images ({per_class} per class)")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Entry point and format detection
# ---------------------------------------------------------------------------------------------


def load_dataset(
    path: PathLike,
    *,
    format: str = "auto",
    seed: int = 0,
    test_fraction: float = 0.2,
    coarse: bool = True,
) -> LabelledDataset:
    """Read a labelled dataset with a train and a test split.

    ``format`` is one of :data:`FORMATS`; ``"auto"`` detects it from what is at ``path``.
    ``seed`` and ``test_fraction`` are used only by layouts without a given split (class folders
    only, CSV without a split column): each class is split on its own, deterministically.
    ``coarse`` selects CIFAR-100's 20 super-classes (the paper's protocol) instead of the 100
    fine classes.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"dataset path not found: {path}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if format == "auto":
        format = _detect_format(path)

    if format == "folder":
        return _load_folder(path, seed, test_fraction)
    if format == "zip":
        return _load_zip(path, seed, test_fraction)
    if format == "cifar10":
        return _load_cifar10(path)
    if format == "cifar100":
        return _load_cifar100(path, coarse)
    if format in ("mnist", "idx"):
        return _load_idx(path, fashion=None)
    if format == "fashion-mnist":
        return _load_idx(path, fashion=True)
    return _load_csv(path, seed, test_fraction)


def _detect_format(path: Path) -> str:
    """Guess the format from the files at ``path``; ValueError listing what was looked for."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        if zipfile.is_zipfile(path):
            return "zip"
    elif path.is_dir():
        if _find_cifar_dir(path, CIFAR10_DIR, ("batches.meta", "test_batch", *CIFAR10_TRAIN_FILES)):
            return "cifar10"
        if _find_cifar_dir(path, CIFAR100_DIR, ("meta", "train", "test")):
            return "cifar100"
        if _find_idx_dir(path, prefer_fashion=False):
            return "idx"
        if _subdirs(path):
            return "folder"
    raise ValueError(
        f"could not detect the dataset format of {path}; looked for: a .csv manifest, a zip archive, "
        f"{CIFAR10_DIR}/ (data_batch_1..5, test_batch, batches.meta), "
        f"{CIFAR100_DIR}/ (train, test, meta), "
        f"idx files ({IDX_FILES['train_images']}[.gz] etc.) in ./, raw/, MNIST/raw/ or FashionMNIST/raw/, "
        f"and class folders (train/<class>/, test/<class>/ or <class>/); "
        f"pass format= one of {', '.join(FORMATS[1:])} to force one"
    )


# ---------------------------------------------------------------------------------------------
# Splitting helpers
# ---------------------------------------------------------------------------------------------


def _n_test(n: int, test_fraction: float) -> int:
    """Test images out of ``n`` in one class: rounded, and at least one image on each side if n >= 2."""
    if n < 2:
        return 0
    return min(max(int(np.floor(n * test_fraction + 0.5)), 1), n - 1)


def _split_by_seed(
    labels: np.ndarray, classes: list[str], seed: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random train/test split; returns (train_idx, test_idx), each in original order.

    Each class is shuffled by its own generator seeded with (seed, crc32(class name)), so a
    class's split depends only on the seed, its name and its own images: adding a class to the
    dataset does not reshuffle the others.
    """
    is_test = np.zeros(len(labels), dtype=bool)
    for c, class_name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
        is_test[rng.permutation(members)[: _n_test(len(members), test_fraction)]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _check_not_empty(name: str, split_name: str, n: int, path: Path) -> None:
    if n == 0:
        raise ValueError(f"{name}: no {split_name} images found in {path}")


# ---------------------------------------------------------------------------------------------
# Class folders
# ---------------------------------------------------------------------------------------------


def _is_ignored_name(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIR_NAMES


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_ignored_name(p.name))


def _class_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """All images under ``folder/<class>/`` (recursive, sorted) for the classes present there."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            continue  # a class may be missing from one split
        files = list_image_files(class_dir)
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels


def _load_folder(path: Path, seed: int, test_fraction: float) -> LabelledDataset:
    """Read ``train/<class>/`` + ``test/<class>/``, or ``<class>/`` split by seed."""
    if not path.is_dir():
        raise ValueError(f"format 'folder' needs a directory, got {path}")
    name = path.resolve().name
    top = _subdirs(path)
    if not top:
        raise ValueError(f"no class folders found in {path}")
    has_train, has_test = "train" in top, "test" in top
    if has_train != has_test:
        raise ValueError(
            f"{path} has a {'train' if has_train else 'test'}/ folder but no "
            f"{'test' if has_train else 'train'}/ folder; give both, or only class folders"
        )

    if has_train:
        classes = sorted(set(_subdirs(path / "train")) | set(_subdirs(path / "test")))
        if not classes:
            raise ValueError(f"no class folders found in {path / 'train'} or {path / 'test'}")
        train_paths, train_labels = _class_files(path / "train", classes)
        test_paths, test_labels = _class_files(path / "test", classes)
    else:
        classes = top
        paths, labels = _class_files(path, classes)
        train_idx, test_idx = _split_by_seed(np.asarray(labels), classes, seed, test_fraction)
        train_paths, train_labels = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
        test_paths, test_labels = [paths[i] for i in test_idx], [labels[i] for i in test_idx]

    _check_not_empty(name, "train", len(train_paths), path)
    _check_not_empty(name, "test", len(test_paths), path)
    return LabelledDataset(
        name=name,
        classes=classes,
        train=Split(FileSource(train_paths, root=path), np.asarray(train_labels)),
        test=Split(FileSource(test_paths, root=path), np.asarray(test_labels)),
    )


# ---------------------------------------------------------------------------------------------
# Zip archives
# ---------------------------------------------------------------------------------------------


def _zip_image_members(zip_path: Path) -> list[tuple[str, list[str]]]:
    """Image members of the archive with their path parts, from one ``namelist()`` pass.

    Folders, hidden files and ``__MACOSX/`` debris are skipped. Plain string operations (no
    ``PurePosixPath`` per member) keep 60,000 members well under a second.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"not a readable zip archive: {zip_path} ({error})") from error
    members = []
    for member in names:
        if member.endswith("/"):
            continue
        parts = member.split("/")
        if os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
            continue
        if member.startswith(".") or "/." in member or "__MACOSX" in parts:  # hidden or macOS debris
            continue
        members.append((member, parts))
    return members


def _load_zip(path: Path, seed: int, test_fraction: float) -> LabelledDataset:
    """Read class folders from a zip archive in place; members are listed once and never extracted.

    The layout is that of the "folder" format, optionally under one top-level folder
    (``cifar10/train/<class>/...``): a first path component shared by every image that is not
    itself ``train``/``test`` is taken to be such a wrapper and skipped.
    """
    if not path.is_file():
        raise ValueError(f"format 'zip' needs a zip file, got {path}")
    name = path.stem
    listed = _zip_image_members(path)
    if not listed:
        raise ValueError(f"no images found in zip archive {path}")

    members = [member for member, _ in listed]
    parts = [p for _, p in listed]
    firsts = {p[0] for p in parts}
    if len(firsts) == 1 and firsts.isdisjoint({"train", "test"}) and all(len(p) >= 3 for p in parts):
        parts = [p[1:] for p in parts]
        firsts = {p[0] for p in parts}

    has_train, has_test = "train" in firsts, "test" in firsts
    if has_train != has_test:
        raise ValueError(
            f"zip archive {path} has a {'train' if has_train else 'test'}/ folder but no "
            f"{'test' if has_train else 'train'}/ folder; give both, or only class folders"
        )

    # (class name, member) pairs per split; files not inside a class folder are ignored.
    if has_train:
        by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
        for member, p in zip(members, parts):
            if p[0] in by_split and len(p) >= 3:
                by_split[p[0]].append((p[1], member))
        train_items, test_items = sorted(by_split["train"]), sorted(by_split["test"])
        classes = sorted({c for c, _ in train_items} | {c for c, _ in test_items})
        index = {c: i for i, c in enumerate(classes)}
        train_members = [m for _, m in train_items]
        train_labels = np.array([index[c] for c, _ in train_items], dtype=np.int64)
        test_members = [m for _, m in test_items]
        test_labels = np.array([index[c] for c, _ in test_items], dtype=np.int64)
    else:
        items = sorted((p[0], member) for member, p in zip(members, parts) if len(p) >= 2)
        classes = sorted({c for c, _ in items})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[c] for c, _ in items], dtype=np.int64)
        train_idx, test_idx = _split_by_seed(labels, classes, seed, test_fraction)
        train_members, train_labels = [items[i][1] for i in train_idx], labels[train_idx]
        test_members, test_labels = [items[i][1] for i in test_idx], labels[test_idx]

    _check_not_empty(name, "train", len(train_members), path)
    _check_not_empty(name, "test", len(test_members), path)
    return LabelledDataset(
        name=name,
        classes=classes,
        train=Split(ZipSource(path, members=train_members), train_labels),
        test=Split(ZipSource(path, members=test_members), test_labels),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR pickles
# ---------------------------------------------------------------------------------------------


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
        raise FileNotFoundError(f"CIFAR file not found: {file}")
    with open(file, "rb") as handle:
        try:
            data = _CifarUnpickler(handle, file).load()
        except pickle.UnpicklingError:
            raise
        except Exception as error:  # truncated/corrupt files raise EOFError, ValueError, ...
            raise ValueError(f"{file}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a dict, found {type(data).__name__}")
    return data


def _get(data: dict, key: str, file: Path) -> Any:
    """``data[b'key']`` (as in the official Python 2 files) or ``data['key']``; ValueError naming the file."""
    for candidate in (key.encode("ascii"), key):
        if candidate in data:
            return data[candidate]
    raise ValueError(f"{file}: missing key {key!r}")


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _cifar_arrays(file: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,32,32,3) uint8 and labels (N,) int64 of one CIFAR batch file, validated."""
    batch = _load_cifar_pickle(file)
    data = _get(batch, "data", file)
    labels = np.asarray(_get(batch, label_key, file))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ValueError(f"{file}: 'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{file}: {label_key!r} must hold {len(data)} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{file}: {label_key!r} values must be in [0, {n_classes})")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _find_cifar_dir(path: Path, folder_name: str, required: Sequence[str]) -> Path | None:
    """``path/folder_name`` (torchvision's root) or ``path`` itself, if it holds the required files."""
    for candidate in (path / folder_name, path):
        if candidate.is_dir() and all((candidate / f).is_file() for f in required):
            return candidate
    return None


def _load_cifar10(path: Path) -> LabelledDataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (50,000 train images in five batches, 10,000 test)."""
    folder = _find_cifar_dir(path, CIFAR10_DIR, ("batches.meta", "test_batch", *CIFAR10_TRAIN_FILES))
    if folder is None:
        raise ValueError(
            f"no CIFAR-10 files in {path}: expected {CIFAR10_DIR}/ with "
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


def _load_cifar100(path: Path, coarse: bool) -> LabelledDataset:
    """CIFAR-100 from ``cifar-100-python``: 20 coarse super-classes if ``coarse``, else 100 fine ones."""
    folder = _find_cifar_dir(path, CIFAR100_DIR, ("meta", "train", "test"))
    if folder is None:
        raise ValueError(f"no CIFAR-100 files in {path}: expected {CIFAR100_DIR}/ with train, test and meta")
    kind = "coarse" if coarse else "fine"
    meta_file = folder / "meta"
    classes = [_as_text(n) for n in _get(_load_cifar_pickle(meta_file), f"{kind}_label_names", meta_file)]
    train_images, train_labels = _cifar_arrays(folder / "train", f"{kind}_labels", len(classes))
    test_images, test_labels = _cifar_arrays(folder / "test", f"{kind}_labels", len(classes))
    return LabelledDataset(
        name="cifar100" if coarse else "cifar100-fine",
        classes=classes,
        train=Split(ArraySource(train_images), train_labels),
        test=Split(ArraySource(test_images), test_labels),
    )


# ---------------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

# idx type codes (third magic byte); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(file: Path) -> bytes:
    """The file's content, decompressed if it ends in .gz; corrupt gzip -> ValueError naming it."""
    if file.suffix != ".gz":
        return file.read_bytes()
    try:
        with gzip.open(file, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{file}: corrupt or truncated gzip file ({error})") from error


def read_idx(file: PathLike) -> np.ndarray:
    """Read one idx file (the MNIST format), raw or ``.gz``, into a numpy array of its shape.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follows. Sizes are checked against the header before any
    array is built, so truncated (or over-long) files raise ``ValueError`` naming the file.
    """
    file = Path(file)
    raw = _read_bytes(file)
    if len(raw) < 4:
        raise ValueError(f"{file}: truncated idx file ({len(raw)} bytes, no header)")
    if raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{file}: not an idx file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{file}: truncated idx file (header needs {header_size} bytes, file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=object))
    expected = count * dtype.itemsize
    actual = len(raw) - header_size
    if actual != expected:
        problem = "truncated idx file" if actual < expected else "idx file has trailing bytes"
        raise ValueError(f"{file}: {problem}: header {dims} needs {expected} data bytes, found {actual}")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (uncompressed preferred)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_dir(path: Path, prefer_fashion: bool) -> Path | None:
    """The first of path, path/raw, path/MNIST/raw, path/FashionMNIST/raw holding all four idx files."""
    torchvision_dirs = [path / "MNIST" / "raw", path / "FashionMNIST" / "raw"]
    if prefer_fashion:
        torchvision_dirs.reverse()
    for candidate in (path, path / "raw", *torchvision_dirs):
        if candidate.is_dir() and all(_idx_file(candidate, stem) for stem in IDX_FILES.values()):
            return candidate
    return None


def _idx_pair(folder: Path, images_stem: str, labels_stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,H,W) uint8 and labels (N,) int64 from one idx image/label file pair, validated."""
    images_file = _idx_file(folder, images_stem)
    labels_file = _idx_file(folder, labels_stem)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_file}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_file}: labels must be digits 0..9")
    return images, labels.astype(np.int64)


def _names_suggest_fashion(path: Path, folder: Path) -> bool:
    """True if the dataset's own folder names mention "fashion" (e.g. ``FashionMNIST/raw``).

    Looks at the given folder's name (its parent's if it is a ``raw`` folder) and at the folders
    between it and the idx files, not at unrelated ancestors higher up.
    """
    path = path.resolve()
    names = [path.name, *folder.resolve().relative_to(path).parts]
    if path.name == "raw":
        names.append(path.parent.name)
    return any("fashion" in name.lower() for name in names)


def _load_idx(path: Path, fashion: bool | None) -> LabelledDataset:
    """MNIST or Fashion-MNIST from idx files; ``fashion=None`` decides from the folder names."""
    folder = _find_idx_dir(path, prefer_fashion=bool(fashion)) if path.is_dir() else None
    if folder is None:
        raise ValueError(
            f"no idx files in {path}: expected {', '.join(IDX_FILES.values())} (optionally .gz) "
            f"in it or in raw/, MNIST/raw/ or FashionMNIST/raw/"
        )
    if fashion is None:
        fashion = _names_suggest_fashion(path, folder)
    train_images, train_labels = _idx_pair(folder, IDX_FILES["train_images"], IDX_FILES["train_labels"])
    test_images, test_labels = _idx_pair(folder, IDX_FILES["test_images"], IDX_FILES["test_labels"])
    return LabelledDataset(
        name="fashion-mnist" if fashion else "mnist",
        classes=list(FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES),
        train=Split(ArraySource(train_images), train_labels),
        test=Split(ArraySource(test_images), test_labels),
    )


# ---------------------------------------------------------------------------------------------
# CSV manifest
# ---------------------------------------------------------------------------------------------


def _sorted_class_names(names: set[str]) -> list[str]:
    """Class names sorted numerically if they are all integers ("2" before "10"), else as text."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _load_csv(path: Path, seed: int, test_fraction: float) -> LabelledDataset:
    """Read a manifest with header ``path,label[,split]``; paths are relative to the CSV's folder."""
    if not path.is_file():
        raise ValueError(f"format 'csv' needs a CSV file, got {path}")
    root = path.parent
    rows: list[tuple[Path, str, str | None]] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise ValueError(f"{path}: header must be path,label[,split], found {','.join(columns) or 'nothing'}")
        reader.fieldnames = columns
        has_split = "split" in columns
        for row in reader:
            line = reader.line_num
            relative = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            if not relative or not label:
                raise ValueError(f"{path} line {line}: empty path or label")
            file = root / relative
            if not file.is_file():
                raise FileNotFoundError(f"{path} line {line}: image file not found: {file}")
            split = None
            if has_split:
                split = (row["split"] or "").strip().lower()
                if split not in ("train", "test"):
                    raise ValueError(f"{path} line {line}: split must be 'train' or 'test', got {row['split']!r}")
            rows.append((file, label, split))
    if not rows:
        raise ValueError(f"no images listed in {path}")

    classes = _sorted_class_names({label for _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    files = [file for file, _, _ in rows]
    labels = np.array([index[label] for _, label, _ in rows], dtype=np.int64)
    if has_split:
        train_idx = np.array([i for i, (_, _, s) in enumerate(rows) if s == "train"], dtype=np.int64)
        test_idx = np.array([i for i, (_, _, s) in enumerate(rows) if s == "test"], dtype=np.int64)
    else:
        train_idx, test_idx = _split_by_seed(labels, classes, seed, test_fraction)

    name = path.stem
    _check_not_empty(name, "train", len(train_idx), path)
    _check_not_empty(name, "test", len(test_idx), path)
    return LabelledDataset(
        name=name,
        classes=classes,
        train=Split(FileSource([files[i] for i in train_idx], root=root), labels[train_idx]),
        test=Split(FileSource([files[i] for i in test_idx], root=root), labels[test_idx]),
    )
