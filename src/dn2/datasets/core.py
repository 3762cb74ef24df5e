"""The structures every dataset reader returns, the reader interface, and the splitting rules."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..config import image_memory_bytes
from ..images import ImageSource, ZipArchive, printable, read_file

__all__ = [
    "DatasetReader",
    "LabelledDataset",
    "LoadOptions",
    "MaskSource",
    "MaskedDataset",
    "Split",
    "SubsetSource",
    "check_not_empty",
    "decode_mask",
    "describe",
    "split_by_seed",
    "subset",
]


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


def decode_mask(data: bytes, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask file's bytes -> (H, W) bool, defect where the value is > 127 (or set, in mode "1").

    The mask must be a one-channel image (mode "1" or "L"), of ``size`` (H, W) when given, and within
    ``dn2.config`` ``image_memory``; every problem is a ``ValueError`` naming the file.

    Example:
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 255).save(buf, "PNG")
        >>> decode_mask(buf.getvalue(), "m.png").tolist()
        [[True, True, True], [True, True, True]]
        >>> decode_mask(buf.getvalue(), "m.png", size=(3, 3))
        Traceback (most recent call last):
        ...
        ValueError: mask m.png is 2 x 3 (H x W), its image is 3 x 3
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        if im.mode not in ("1", "L"):
            raise ValueError(f"mask {name} must be a one-channel image (mode 1 or L), got mode {im.mode}")
        if im.width * im.height * 2 > image_memory_bytes():
            raise ValueError(f"mask {name}: {im.width} x {im.height} pixels exceed dn2.config image_memory")
        if size is not None and (im.height, im.width) != tuple(size):
            raise ValueError(f"mask {name} is {im.height} x {im.width} (H x W), its image is {size[0]} x {size[1]}")
        pixels = np.asarray(im)
    except ValueError:
        raise
    except Exception as e:  # Pillow's many errors for what is not a readable image
        raise ValueError(f"mask {name} cannot be read ({type(e).__name__}: {e})") from None
    return pixels if im.mode == "1" else pixels > 127


class MaskSource:
    """The ground-truth masks of a test split, read on demand: ``load(i, size)`` -> (H, W) bool.

    ``files[i]`` is the mask of test image i (a path, or a member of ``archive``), or None for a normal
    image, whose mask is all False. ``name(i)`` names the mask file (for errors). A defect mask that
    marks no pixel is an error unless ``allow_empty`` (a dataset known to ship such masks says so).
    """

    def __init__(self, files: Sequence[str | os.PathLike | None], archive: str | os.PathLike | None = None,
                 allow_empty: bool = False):
        self.files = list(files)
        self.archive = Path(archive) if archive is not None else None
        self.allow_empty = allow_empty

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str | None:
        f = self.files[i]
        if f is None:
            return None
        return f"{printable(self.archive)}:{printable(f)}" if self.archive is not None else printable(f)

    def load(self, i: int, size: tuple[int, int] | None) -> np.ndarray:
        """The mask of test image ``i`` whose size is ``size`` (H, W; None: not checked); a defect mask must
        mark some pixel. A normal image's mask is all False (of ``size``, or 0 x 0 without it)."""
        f = self.files[i]
        if f is None:
            return np.zeros(size or (0, 0), dtype=bool)
        name = self.name(i)
        try:
            if self.archive is not None:
                with ZipArchive(self.archive) as archive:
                    data = archive.read(str(f))
            else:
                data = read_file(f, name)
        except Exception as e:  # BadImageError: missing, too large, not a regular file...
            raise ValueError(f"mask {name} cannot be read: {e}") from None
        mask = decode_mask(data, name, size)
        if not mask.any() and not self.allow_empty:
            raise ValueError(f"mask {name} marks no defect pixel, but its image is labelled defective")
        return mask


@dataclass
class MaskedDataset(LabelledDataset):
    """A labelled dataset for localisation: class ``normal`` (0) is defect-free, the others are defect
    types; every training image is normal; ``masks[i]`` is the ground truth of test image ``i``."""

    masks: MaskSource = field(default_factory=lambda: MaskSource([]))
    normal: int = 0

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.test):
            raise ValueError(f"{self.name}: {len(self.masks)} masks for {len(self.test)} test images")
        if (self.train.labels != self.normal).any():
            raise ValueError(f"{self.name}: training images must all be of the normal class {self.classes[self.normal]!r}")


@dataclass(frozen=True)
class LoadOptions:
    """What ``load_dataset`` passes on to a reader; each reader uses the options that apply to it.

    ``seed``, ``test_fraction``: the split of layouts that do not give one (see :func:`split_by_seed`);
    ``coarse``: CIFAR-100's 20 super-classes instead of the 100 fine classes.
    """

    seed: int = 0
    test_fraction: float = 0.2
    coarse: bool = True


class DatasetReader:
    """One on-disk form of a labelled dataset.

    A reader has a ``name`` (the value of ``load_dataset(format=...)``), optional ``aliases``, a
    ``looks_for`` phrase (what :meth:`detect` recognises, for the error of a failed detection), a
    cheap :meth:`detect` (no exception, no reading of image data) and :meth:`load`. Adding a
    format is one subclass and one entry in :data:`dn2.datasets.READERS` (before the readers whose
    ``detect`` would also accept its layout: the class-folder reader accepts any folder).
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    looks_for: str = ""

    def detect(self, path: Path) -> bool:
        """True if ``path`` looks like this format (used by ``format="auto"``)."""
        return False

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        """Read the dataset at ``path``; ``ValueError`` naming what is missing or wrong."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


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

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return self.base.load(int(self.indices[i]), max_side=max_side)

    def fingerprint(self) -> str:
        """The base source's fingerprint and the indices."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(self.base.fingerprint().encode())
        h.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()


def subset(split: Split, indices: Iterable[int] | np.ndarray) -> Split:
    """Return a view of ``split`` holding only the images at ``indices`` (ints or a boolean mask).

    Example:
        >>> from dn2.images import as_source
        >>> split = Split(as_source(np.zeros((4, 8, 8), np.uint8)), [0, 1, 0, 1])
        >>> subset(split, split.labels == 1).source.names()
        ['array[1]', 'array[3]']
    """
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


def _n_test(n: int, test_fraction: float) -> int:
    """Test images out of ``n`` in one class: rounded, and at least one image on each side if n >= 2."""
    if n < 2:
        return 0
    return min(max(int(np.floor(n * test_fraction + 0.5)), 1), n - 1)


def split_by_seed(
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
        rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8", "surrogateescape"))])
        is_test[rng.permutation(members)[: _n_test(len(members), test_fraction)]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def check_not_empty(name: str, split_name: str, n: int, path: Path) -> None:
    """ValueError if a split came out empty."""
    if n == 0:
        raise ValueError(f"{name}: no {split_name} images found in {printable(path)}")
