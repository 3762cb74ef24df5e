"""The Magnetic Tile Defects dataset (Huang et al. 2018), as distributed: a zip (or its folder) of
``MT_<type>/Imgs/<name>.jpg`` images, each with a ``<name>.png`` mask of the same size.

``MT_Free`` holds the defect-free images, the other folders the defect types (Blowhole, Break, Crack,
Fray, Uneven). The split is fixed and documented, so results repeat:

- ``mtd`` (THE split): the defect-free images sorted by name, the first ``1 - test_fraction`` (80%,
  rounded down: 761 of 952) train, the rest + every defective image test. Names start with the
  acquisition session (``exp0`` .. ``exp6``), so the held-out normal images are mostly the last session,
  never seen in training, while the defective ones come from all sessions: a harder test than a mixed
  split (patch methods lose a little ROCAUC to it: BENCHMARKS.md, "Anomaly maps").
- ``mtd-mixed`` (a sensitivity check, asked for explicitly): every 5th defect-free image by name
  (1 / ``test_fraction``) is test, so every session is in both sets.

Masks of defect-free images are not read (they are all zero); a defective image without its mask is
an error naming the mask it expected. Four ``MT_Uneven`` masks of the archive as distributed mark no
pixel (exp3_num_45042, exp4_num_45057, exp4_num_124690, exp4_num_352527): they are allowed, as in the
study the protocol comes from; those images count in the image metrics and add only normal pixels.

Example:
    >>> ds = load_dataset("magnetic-tile-defects.zip")  # doctest: +SKIP
    >>> describe(ds)  # doctest: +SKIP
    'magnetic-tile-defects: 6 classes, train 761 images (0-761 per class), test 583 images (32-191 per class)'
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..images import BadImageError, FileSource, ZipArchive, ZipSource, is_hidden, open_regular, printable
from .core import DatasetReader, LoadOptions, MaskedDataset, MaskSource, Split, check_not_empty

__all__ = ["MTD_NORMAL", "MtdReader", "mtd_layout"]

MTD_NORMAL = "MT_Free"


def mtd_layout(paths: list[str], where: str, test_fraction: float, mixed: bool) -> dict:
    """The MTD split from relative paths (``[wrapper/]MT_<type>/Imgs/<name>.jpg|png``), as a dict of
    ``classes``, ``train`` and ``test`` (lists of image paths), ``test_labels`` and ``masks`` (mask path or None)."""
    files = set(paths)
    images: dict[str, list[str]] = {}
    for p in paths:
        parts = p.split("/")
        if len(parts) >= 3 and parts[-2] == "Imgs" and parts[-3].startswith("MT_") and p.lower().endswith(".jpg") \
                and not any(is_hidden(x) for x in parts):
            images.setdefault(parts[-3], []).append(p)
    if MTD_NORMAL not in images:
        raise ValueError(f"{where}: no {MTD_NORMAL}/Imgs/*.jpg images: not the Magnetic Tile Defects layout")
    defects = sorted(t for t in images if t != MTD_NORMAL)
    if not defects:
        raise ValueError(f"{where}: no defect folders (MT_<type>/Imgs/) besides {MTD_NORMAL}")
    free = sorted(images[MTD_NORMAL])
    if mixed:
        step = max(2, int(round(1.0 / test_fraction)))
        test_free = [f for i, f in enumerate(free) if i % step == step - 1]
        train = [f for i, f in enumerate(free) if i % step != step - 1]
    else:
        n_train = int(len(free) * (1.0 - test_fraction))
        train, test_free = free[:n_train], free[n_train:]
    test, labels, masks = list(test_free), [0] * len(test_free), [None] * len(test_free)
    for c, kind in enumerate(defects, start=1):
        for f in sorted(images[kind]):
            mask = f[:-4] + ".png"
            if mask not in files:
                raise ValueError(f"{where}: the mask {printable(mask)} of defective image {printable(f)} is missing")
            test.append(f)
            labels.append(c)
            masks.append(mask)
    return {"classes": [MTD_NORMAL, *defects], "train": train, "test": test, "test_labels": labels, "masks": masks}


def first_zip_names(path: Path, n: int = 3) -> list[str]:
    """The first ``n`` member names of a zip archive from its central directory, reading a few KB only
    (opening a 60,000-member archive with ``zipfile`` takes seconds); [] for anything unexpected."""
    try:
        stream, info = open_regular(path)
    except BadImageError:
        return []
    names: list[str] = []
    with stream:
        try:
            tail = min(info.st_size, 65536 + 22)
            stream.seek(info.st_size - tail)
            data = stream.read(tail)
            end = data.rfind(b"PK\x05\x06")
            if end < 0 or len(data) < end + 22:
                return []
            offset = struct.unpack("<I", data[end + 16:end + 20])[0]
            if offset == 0xFFFFFFFF:  # zip64: the classic record does not say; not worth more reading here
                return []
            stream.seek(offset)
            for _ in range(n):
                header = stream.read(46)
                if len(header) < 46 or header[:4] != b"PK\x01\x02":
                    break
                name_len, extra_len, comment_len = struct.unpack("<HHH", header[28:34])
                names.append(stream.read(name_len).decode("utf-8", "replace"))
                stream.seek(extra_len + comment_len, 1)
        except (OSError, struct.error, ValueError):
            return names
    return names


class MtdReader(DatasetReader):
    """Magnetic Tile Defects (zip or folder) with its masks; ``mixed`` selects the sensitivity split."""

    looks_for = "the Magnetic Tile Defects layout (MT_Free/Imgs/*.jpg + masks)"

    def __init__(self, name: str = "mtd", mixed: bool = False):
        self.name = name
        self.mixed = mixed

    def detect(self, path: Path) -> bool:
        if self.mixed:
            return False  # the sensitivity split is asked for by name, never detected
        if path.is_dir():
            return (path / MTD_NORMAL / "Imgs").is_dir()
        if path.suffix.lower() != ".zip":
            return False
        # cheap: the first members of the archive (MT_<type>/..., perhaps under one wrapper folder)
        return any(part.startswith("MT_") for name in first_zip_names(path) for part in name.split("/")[:2])

    def load(self, path: Path, options: LoadOptions) -> MaskedDataset:
        if path.is_dir():
            files = sorted(str(p.relative_to(path)).replace("\\", "/") for p in path.rglob("*") if p.is_file())
            layout = mtd_layout(files, printable(path), options.test_fraction, self.mixed)
            name = printable(path.resolve().name)

            def source(members: list[str]) -> FileSource:
                return FileSource([path / m for m in members], root=path)

            masks = MaskSource([None if m is None else path / m for m in layout["masks"]], allow_empty=True)
        else:
            with ZipArchive(path) as archive:
                names = archive.names()
            layout = mtd_layout(names, f"zip archive {printable(path)}", options.test_fraction, self.mixed)
            name = printable(path.stem)

            def source(members: list[str]) -> ZipSource:
                return ZipSource(path, members=members)

            masks = MaskSource(layout["masks"], archive=path, allow_empty=True)
        check_not_empty(name, "train", len(layout["train"]), path)
        train = Split(source(layout["train"]), np.zeros(len(layout["train"]), dtype=np.int64))
        test = Split(source(layout["test"]), layout["test_labels"])
        suffix = "-mixed" if self.mixed else ""
        return MaskedDataset(name + suffix, layout["classes"], train, test, masks=masks)
