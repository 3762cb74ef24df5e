"""What the benchmark scripts share: the machine header, embedding a dataset's splits through the cache,
and the one-class protocol scored by the product's own detector.

Scripts run as ``python benchmarks/<name>.py`` and import this module by name.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dn2 import KNNDetector
from dn2.bench import rocauc
from dn2.cache import cached_embed
from dn2.datasets import LabelledDataset
from dn2.features import Embedder
from machine import cpu_model_and_flags, header

__all__ = ["cpu_model_and_flags", "embed_splits", "header", "unimodal_aucs"]


def embed_splits(ds: LabelledDataset, backbone: str, *, use_cache: bool = True,
                 **options: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Train and test embeddings of ``ds`` with ``Embedder(backbone, **options)`` through the embedding
    cache, and the seconds it took (about 0 when both were cached)."""
    options.setdefault("progress", False)
    embedder = Embedder(backbone=backbone, **options)
    start = time.perf_counter()
    train = cached_embed(embedder, ds.train.source, use_cache=use_cache)
    test = cached_embed(embedder, ds.test.source, use_cache=use_cache)
    return train.vectors, test.vectors, time.perf_counter() - start


def unimodal_aucs(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, *, k: int = 2,
                  normalize: str = "none", index: str = "exact", index_params: dict | None = None) -> list[float]:
    """Per-class ROCAUC % of the one-class protocol, each class scored by a ``KNNDetector`` fitted on its
    training embeddings (transform fitted on that class only): exactly what a user of dn2 would get."""
    aucs = []
    for c in range(int(ytr.max()) + 1):
        detector = KNNDetector(k=k, normalize=normalize, index=index, index_params=index_params)
        aucs.append(rocauc(yte != c, detector.fit(xtr[ytr == c]).anomaly_score(xte)))
    return aucs
