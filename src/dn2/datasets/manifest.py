"""A CSV manifest of image paths and labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..images import FileSource, printable
from .core import DatasetReader, LabelledDataset, LoadOptions, Split, check_not_empty, split_by_seed

__all__ = ["CsvReader"]


def _sorted_class_names(names: set[str]) -> list[str]:
    """Class names sorted numerically if they are all integers ("2" before "10"), else as text."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class CsvReader(DatasetReader):
    """A manifest with header ``path,label[,split]``; paths are relative to the CSV's folder.

    Without a split column each class is split by seed. The listed files must exist (checked
    here, so that a typo fails before any embedding); whether they are good images is found out
    when each is read.
    """

    name = "csv"
    looks_for = "a .csv manifest"

    def detect(self, path: Path) -> bool:
        return path.suffix.lower() == ".csv" and path.is_file()

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        return _load_csv(path, options.seed, options.test_fraction)


def _load_csv(path: Path, seed: int, test_fraction: float) -> LabelledDataset:
    """Read the manifest (see :class:`CsvReader`)."""
    if not path.is_file():
        raise ValueError(f"format 'csv' needs a CSV file, got {printable(path)}")
    try:
        return _read_manifest(path, seed, test_fraction)
    except UnicodeDecodeError as error:
        raise ValueError(f"{printable(path)}: not a UTF-8 text file ({error.reason} at byte {error.start})") from error


def _read_manifest(path: Path, seed: int, test_fraction: float) -> LabelledDataset:
    root = path.parent
    rows: list[tuple[Path, str, str | None]] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise ValueError(f"{printable(path)}: header must be path,label[,split], found {','.join(columns) or 'nothing'}")
        reader.fieldnames = columns
        has_split = "split" in columns
        for row in reader:
            line = reader.line_num
            relative = (row["path"] or "").strip()
            label = (row["label"] or "").strip()
            if not relative or not label:
                raise ValueError(f"{printable(path)} line {line}: empty path or label")
            file = root / relative
            if not file.exists():  # a typo fails now; a file that is not a usable image fails when read
                raise FileNotFoundError(f"{printable(path)} line {line}: image file not found: {printable(file)}")
            split = None
            if has_split:
                split = (row["split"] or "").strip().lower()
                if split not in ("train", "test"):
                    raise ValueError(f"{printable(path)} line {line}: split must be 'train' or 'test', got {row['split']!r}")
            rows.append((file, label, split))
    if not rows:
        raise ValueError(f"no images listed in {printable(path)}")

    classes = _sorted_class_names({label for _, label, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    files = [file for file, _, _ in rows]
    labels = np.array([index[label] for _, label, _ in rows], dtype=np.int64)
    if has_split:
        train_idx = np.array([i for i, (_, _, s) in enumerate(rows) if s == "train"], dtype=np.int64)
        test_idx = np.array([i for i, (_, _, s) in enumerate(rows) if s == "test"], dtype=np.int64)
    else:
        train_idx, test_idx = split_by_seed(labels, classes, seed, test_fraction)

    name = path.stem
    check_not_empty(name, "train", len(train_idx), path)
    check_not_empty(name, "test", len(test_idx), path)
    return LabelledDataset(
        name=name,
        classes=classes,
        train=Split(FileSource([files[i] for i in train_idx], root=root), labels[train_idx]),
        test=Split(FileSource([files[i] for i in test_idx], root=root), labels[test_idx]),
    )
