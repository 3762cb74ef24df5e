"""The dataset readers, in detection order, and :func:`load_dataset`, which asks them."""

from __future__ import annotations

import os
from pathlib import Path

from ..images import printable
from .cifar import Cifar100Reader, Cifar10Reader
from .core import DatasetReader, LabelledDataset, LoadOptions
from .folders import FolderReader, ZipReader
from .idx import IdxReader
from .manifest import CsvReader
from .mtd import MtdReader
from .mvtec import MvtecReader

__all__ = ["FORMATS", "READERS", "detect_reader", "get_reader", "load_dataset"]

#: Every dataset reader, in the order ``format="auto"`` asks them: the first whose ``detect``
#: accepts the path reads it. Specific layouts come before the class folders, which accept any
#: folder with sub-folders. A new format is one :class:`~dn2.datasets.core.DatasetReader` and one
#: entry here.
READERS: list[DatasetReader] = [
    CsvReader(),
    MtdReader("mtd"),  # before the zip and folder readers, which would take it for class folders
    MtdReader("mtd-mixed", mixed=True),  # the sensitivity split, never detected
    MvtecReader(),
    ZipReader(),
    Cifar10Reader(),
    Cifar100Reader(),
    IdxReader("idx", fashion=None),  # decides MNIST / Fashion-MNIST from the folder names
    IdxReader("mnist", fashion=False),  # explicit formats, never detected
    IdxReader("fashion-mnist", fashion=True),
    FolderReader(),
]

#: Accepted values of ``load_dataset(format=...)``.
FORMATS = ("auto", *(name for reader in READERS for name in (reader.name, *reader.aliases)))


def get_reader(format: str) -> DatasetReader:
    """The reader of a format name (or alias); ValueError listing the formats for an unknown one."""
    for reader in READERS:
        if format == reader.name or format in reader.aliases:
            return reader
    known = ("auto", *(name for reader in READERS for name in (reader.name, *reader.aliases)))
    raise ValueError(f"unknown dataset format {format!r}; expected one of {', '.join(known)}")


def detect_reader(path: Path) -> DatasetReader:
    """The first reader that recognises ``path``; ValueError listing what was looked for."""
    for reader in READERS:
        try:
            if reader.detect(path):
                return reader
        except OSError:  # an unreadable folder is simply not this format
            continue
    looked_for = [reader.looks_for for reader in READERS if reader.looks_for]
    unique = list(dict.fromkeys(looked_for))
    names = [name for reader in READERS for name in (reader.name, *reader.aliases)]
    raise ValueError(
        f"could not detect the dataset format of {printable(path)}; looked for: {', '.join(unique)}; "
        f"pass format= one of {', '.join(names)} to force one"
    )


def load_dataset(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    seed: int = 0,
    test_fraction: float = 0.2,
    coarse: bool = True,
) -> LabelledDataset:
    """Read a labelled dataset with a train and a test split.

    ``format`` is one of :data:`FORMATS`; ``"auto"`` detects it from what is at ``path`` (the
    readers of :data:`READERS`, in order); an explicit format is obeyed as given.
    ``seed`` and ``test_fraction`` are used only by layouts without a given split (class folders
    only, CSV without a split column): each class is split on its own, deterministically.
    ``coarse`` selects CIFAR-100's 20 super-classes (the paper's protocol) instead of the 100
    fine classes.

    Example:
        >>> ds = load_dataset("cifar-10-python/")  # doctest: +SKIP
        >>> describe(ds)  # doctest: +SKIP
        'cifar10: 10 classes, train 50,000 images (5,000-5,000 per class), test 10,000 images (1,000-1,000 per class)'
    """
    path = Path(path)
    reader = None if format == "auto" else get_reader(format)
    if not path.exists():
        raise FileNotFoundError(f"dataset path not found: {printable(path)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    reader = reader or detect_reader(path)
    return reader.load(path, LoadOptions(seed=seed, test_fraction=test_fraction, coarse=coarse))
