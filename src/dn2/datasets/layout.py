"""The class-folder layout, worked out from a list of relative paths (a folder's or a zip's alike).

Accepted layouts, relative to the dataset root:

- ``train/<class>/...`` and ``test/<class>/...`` (a class may be missing from one split);
- only ``<class>/...``: each class is split into train/test by seed (:func:`~dn2.datasets.core.split_by_seed`);
- either of them under one top-level folder (``cifar10/train/<class>/...``): a first component
  shared by every image that is not itself ``train``/``test`` is a wrapper and is skipped.

Images may sit in sub-folders of their class folder; images outside class folders are ignored.
Only the paths matter, so a real folder and a zip archive with the same files give the same
dataset, split included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..images import printable
from .core import split_by_seed

__all__ = ["ClassLayout", "class_layout"]

_SPLITS = ("train", "test")


@dataclass
class ClassLayout:
    """Class names and, per split, positions into the path list given and their labels."""

    classes: list[str]
    train_index: np.ndarray
    train_labels: np.ndarray
    test_index: np.ndarray
    test_labels: np.ndarray


def class_layout(relative: Sequence[Sequence[str]], where: str, seed: int, test_fraction: float) -> ClassLayout:
    """Work out classes and splits from the path components of the image files of a dataset.

    ``relative``: one sequence of path components per image file (relative to the dataset root,
    hidden files already left out); ``where`` names the dataset in errors.

    Example:
        >>> paths = ["train/cat/1.png", "train/dog/2.png", "test/cat/3.png", "test/dog/4.png"]
        >>> layout = class_layout([p.split("/") for p in paths], "pets", seed=0, test_fraction=0.2)
        >>> layout.classes, layout.train_index.tolist(), layout.test_labels.tolist()
        (['cat', 'dog'], [0, 1], [0, 1])
    """
    parts = [tuple(p) for p in relative]
    firsts = {p[0] for p in parts if p}
    if len(firsts) == 1 and firsts.isdisjoint(_SPLITS) and all(len(p) >= 3 for p in parts):
        parts = [p[1:] for p in parts]  # one wrapper folder around everything
        firsts = {p[0] for p in parts}
    has_train, has_test = "train" in firsts, "test" in firsts
    if has_train != has_test:
        present, missing = ("train", "test") if has_train else ("test", "train")
        raise ValueError(f"{where} has a {present}/ folder but no {missing}/ folder; give both, or only class folders")

    # (class, path components, position) of every image inside a class folder, sorted by path
    if has_train:
        items = sorted((printable(p[1]), p, i) for i, p in enumerate(parts) if p[0] in _SPLITS and len(p) >= 3)
    else:
        items = sorted((printable(p[0]), p, i) for i, p in enumerate(parts) if len(p) >= 2)
    classes = sorted({c for c, _, _ in items})
    if not classes:
        raise ValueError(f"no class folders with images found in {where}")
    index = {c: k for k, c in enumerate(classes)}
    positions = np.array([i for _, _, i in items], dtype=np.int64)
    labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    if has_train:
        is_train = np.array([p[0] == "train" for _, p, _ in items], dtype=bool)
        train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    else:
        train, test = split_by_seed(labels, classes, seed, test_fraction)
    return ClassLayout(classes, positions[train], labels[train], positions[test], labels[test])
