"""Embeddings of labelled datasets for the benchmark protocols: :class:`BenchData` and how it is made.

``embed_dataset`` embeds both splits of a :class:`dn2.datasets.LabelledDataset` once per backbone
through the embedding cache (:mod:`dn2.cache`), so a sweep of protocols runs in seconds.

Example:
    >>> from dn2.bench.data import embed_dataset
    >>> from dn2.datasets import load_dataset
    >>> data = embed_dataset(load_dataset("cifar10.zip"), "efficientnet_lite0")  # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..backbones import DEFAULT_BACKBONE
from ..cache import cached_embed
from ..datasets import LabelledDataset, Split, subset
from ..features import Embedder, backbone_names
from ..normalize import STATELESS_NORMALIZATIONS, make_transform

__all__ = ["BenchData", "PAPER", "paper_numbers", "limit_dataset", "embed_dataset", "normalized"]

# Mean ROCAUC % the paper reports (ResNet-101 features). Only these; the rest are figures.
PAPER = {
    "cifar10": {"unimodal": 92.5, "multimodal": 71.7},
    "fashion-mnist": {"unimodal": 94.4},
    "cifar100": {"unimodal": 89.3},
}


@dataclass
class BenchData:
    """Embeddings of a labelled dataset: ``x_train[i]`` has class ``y_train[i]`` (index into ``classes``)."""

    name: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    backbone: str = ""
    blocks: tuple[int, ...] | None = None  # column counts per backbone of an ensemble embedding

    def __post_init__(self) -> None:
        self.x_train = np.ascontiguousarray(self.x_train, dtype=np.float32)
        self.x_test = np.ascontiguousarray(self.x_test, dtype=np.float32)
        self.y_train = np.asarray(self.y_train, dtype=np.int64).reshape(-1)
        self.y_test = np.asarray(self.y_test, dtype=np.int64).reshape(-1)
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("BenchData: each embedding needs exactly one label")
        if self.x_train.ndim != 2 or self.x_test.ndim != 2 or self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"BenchData: need 2-D embeddings of equal width, got {self.x_train.shape} and {self.x_test.shape}")

    def train_of(self, c: int) -> np.ndarray:
        """Training embeddings of class ``c``."""
        return self.x_train[self.y_train == c]

    def train_counts(self) -> np.ndarray:
        return np.bincount(self.y_train, minlength=len(self.classes))

    def describe(self) -> str:
        return f"{self.name}" + (f", {self.backbone}" if self.backbone else "")


def paper_numbers(data: BenchData) -> dict[str, float]:
    """The paper's mean ROCAUC % for this dataset ({} unless the name matches cifar10*, fashion-mnist*, cifar100*)."""
    name = re.sub(r"[^a-z0-9]", "", data.name.lower())
    if name.startswith("cifar100"):
        return PAPER["cifar100"] if len(data.classes) == 20 else {}  # the paper's 20 coarse classes
    if name.startswith("cifar10"):
        return PAPER["cifar10"]
    if name.startswith(("fashionmnist", "fmnist")):
        return PAPER["fashion-mnist"]
    return {}


def limit_dataset(ds: LabelledDataset, max_train_per_class: int | None = None, max_test: int | None = None, seed: int = 0) -> LabelledDataset:
    """A smaller copy for quick runs: at most N random training images per class, ``max_test`` random test images."""
    rng = np.random.default_rng(seed)
    train, test = ds.train, ds.test
    if max_train_per_class is not None:
        keep = [rng.permutation(np.flatnonzero(train.labels == c))[:max_train_per_class] for c in range(len(ds.classes))]
        train = subset(train, np.sort(np.concatenate(keep)))
    if max_test is not None and max_test < len(test):
        test = subset(test, np.sort(rng.permutation(len(test))[:max_test]))
    return LabelledDataset(ds.name, ds.classes, train, test)


def embed_dataset(ds: LabelledDataset, backbone: str = DEFAULT_BACKBONE, *, cache_dir: str | None = None, use_cache: bool = True,
                  echo: Callable[[str], None] = print, **embedder_options: Any) -> BenchData:
    """Embed both splits with one backbone, through the embedding cache; prints the wall time of each.

    The embedder is fitted on the training split: with ``precision="int8"`` one network per backbone is
    quantised on a sample of all training images (every class) and embeds both splits.

    Example:
        >>> from dn2.datasets import load_dataset
        >>> data = embed_dataset(load_dataset("cifar10.zip"), "efficientnet_lite0")  # doctest: +SKIP
    """
    embedder = Embedder(backbone=backbone, **embedder_options).fit(ds.train.source)
    vectors, labels = {}, {}
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        start = time.perf_counter()
        emb = cached_embed(embedder, split.source, cache_dir, use_cache=use_cache)
        vectors[split_name], labels[split_name] = emb.vectors, _labels_of(split, emb.names)
        echo(f"embedded {split_name}: {len(emb.vectors):,} images with {backbone} in {time.perf_counter() - start:.1f} s")
    blocks = tuple(embedder.part_dims()) if len(backbone_names(backbone)) > 1 else None  # an ensemble's parts
    return BenchData(ds.name, ds.classes, vectors["train"], labels["train"], vectors["test"], labels["test"], backbone=backbone,
                     blocks=blocks)


def normalized(data: BenchData, normalize: str) -> BenchData:
    """The same embeddings through a row-wise transform of :mod:`dn2.normalize` (``l2``, ``sqrt_l2``).

    Only row-wise transforms: they need no fitting, so every protocol (whose normal sets change
    from row to row) sees exactly what ``KNNDetector(normalize=...)`` would.
    """
    if normalize not in STATELESS_NORMALIZATIONS:
        raise ValueError(f"dn2 bench --normalize takes one of {STATELESS_NORMALIZATIONS} (row-wise); "
                         f"fitted transforms such as {normalize!r} are compared in benchmarks/ablation.py")
    t = make_transform(normalize, data.blocks)  # an ensemble: each backbone's part on its own
    return BenchData(data.name, data.classes, t.transform(data.x_train), data.y_train, t.transform(data.x_test), data.y_test,
                     backbone=f"{data.backbone}, {normalize}" if data.backbone else normalize)


def _labels_of(split: Split, names: list[str]) -> np.ndarray:
    """Labels of the embedded images (all of them, or those left after skipping bad ones)."""
    if len(names) == len(split):
        return split.labels
    embedded = set(names)
    return split.labels[[i for i in range(len(split)) if split.source.name(i) in embedded]]


