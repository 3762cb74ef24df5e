"""MNIST and Fashion-MNIST as idx files (the MNIST format), raw or gzipped."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..images import ArraySource, BadImageError, open_regular, printable
from .core import DatasetReader, LabelledDataset, LoadOptions, Split

__all__ = ["FASHION_MNIST_CLASSES", "IDX_FILES", "MNIST_CLASSES", "IdxReader", "read_idx"]

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

# idx type codes (third magic byte); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(file: Path) -> bytes:
    """The file's content, decompressed if it ends in .gz; corrupt gzip -> ValueError naming it.

    Only a regular file is read (a FIFO named like an idx file is refused, not waited on).
    """
    try:
        stream, _ = open_regular(file)
    except BadImageError as error:
        raise ValueError(str(error)) from error
    with stream:
        if file.suffix != ".gz":
            return stream.read()
        try:
            with gzip.open(stream, "rb") as handle:
                return handle.read()
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{printable(file)}: corrupt or truncated gzip file ({error})") from error


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Read one idx file (the MNIST format), raw or ``.gz``, into a numpy array of its shape.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follows. Sizes are checked against the header before any
    array is built, so truncated (or over-long) files raise ``ValueError`` naming the file.
    """
    file = Path(file)
    raw = _read_bytes(file)
    if len(raw) < 4:
        raise ValueError(f"{printable(file)}: truncated idx file ({len(raw)} bytes, no header)")
    if raw[0:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{printable(file)}: not an idx file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{printable(file)}: truncated idx file (header needs {header_size} bytes, file has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=object))
    expected = count * dtype.itemsize
    actual = len(raw) - header_size
    if actual != expected:
        problem = "truncated idx file" if actual < expected else "idx file has trailing bytes"
        raise ValueError(f"{printable(file)}: {problem}: header {dims} needs {expected} data bytes, found {actual}")
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
        raise ValueError(f"{printable(images_file)}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{printable(labels_file)}: expected integer labels (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{printable(labels_file)}: {len(labels)} labels for {len(images)} images in {printable(images_file)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{printable(labels_file)}: labels must be digits 0..9")
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




class IdxReader(DatasetReader):
    """MNIST or Fashion-MNIST from the four idx files in ``path``, ``raw/``, ``MNIST/raw/`` or
    ``FashionMNIST/raw/`` (torchvision's layout).

    ``fashion``: True reads Fashion-MNIST, False MNIST, whatever the folders are called (an
    explicit format is obeyed); None (the generic "idx" format, also what detection finds) decides
    from the dataset's own folder names.
    """

    looks_for = (
        f"idx files ({IDX_FILES['train_images']}[.gz] etc.) in ./, raw/, MNIST/raw/ or FashionMNIST/raw/"
    )

    def __init__(self, name: str, fashion: bool | None) -> None:
        self.name = name
        self.fashion = fashion

    def detect(self, path: Path) -> bool:
        # Only the generic reader detects: "mnist" and "fashion-mnist" are chosen by name.
        return self.fashion is None and path.is_dir() and _find_idx_dir(path, prefer_fashion=False) is not None

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        folder = _find_idx_dir(path, prefer_fashion=bool(self.fashion)) if path.is_dir() else None
        if folder is None:
            raise ValueError(
                f"no idx files in {printable(path)}: expected {', '.join(IDX_FILES.values())} (optionally .gz) "
                f"in it or in raw/, MNIST/raw/ or FashionMNIST/raw/"
            )
        fashion = _names_suggest_fashion(path, folder) if self.fashion is None else self.fashion
        train_images, train_labels = _idx_pair(folder, IDX_FILES["train_images"], IDX_FILES["train_labels"])
        test_images, test_labels = _idx_pair(folder, IDX_FILES["test_images"], IDX_FILES["test_labels"])
        return LabelledDataset(
            name="fashion-mnist" if fashion else "mnist",
            classes=list(FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES),
            train=Split(ArraySource(train_images), train_labels),
            test=Split(ArraySource(test_images), test_labels),
        )
