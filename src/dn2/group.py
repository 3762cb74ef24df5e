"""Group anomaly detection: score *sets* of images instead of single images (DN2 paper, Sec. 4.3).

A set is embedded by orderless pooling of its members' embeddings (``mean``, the paper's
choice, or ``max``), then scored by DN2's kNN distance to the pooled normal training sets.
Baselines: ``concat`` (members' embeddings concatenated in the given order; not orderless,
needs equal set sizes) and :func:`covariance_trace` (spread of a set's members, no training).

Example:
    >>> import numpy as np
    >>> from dn2.group import SetDetector
    >>> rng = np.random.default_rng(0)
    >>> normal_sets = [rng.normal(size=(5, 8)) for _ in range(50)]
    >>> det = SetDetector(pooling="mean").fit(normal_sets)
    >>> det.predict([rng.normal(size=(5, 8)) + 6.0]).tolist()
    [-1]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError

from .backbones import DEFAULT_BACKBONE
from .base import ThresholdedScores
from .detector import KNNDetector
from .features import Embedder

POOLINGS = ("mean", "max", "concat")


def pool_set(members: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """One vector for a set of member embeddings (M, D): mean, max, or concatenation (M*D,)."""
    members = np.asarray(members, dtype=np.float32)
    if members.ndim != 2 or len(members) == 0:
        raise ValueError(f"a set must be a non-empty (M, D) array of embeddings, got shape {members.shape}")
    if pooling == "mean":
        return members.mean(axis=0)
    if pooling == "max":
        return members.max(axis=0)
    if pooling == "concat":
        return members.reshape(-1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def pool_sets(sets: Sequence[np.ndarray], pooling: str = "mean") -> np.ndarray:
    """Stack :func:`pool_set` over sets; ``concat`` requires every set to have the same size."""
    if len(sets) == 0:
        raise ValueError("no sets given")
    if pooling == "concat" and len({len(s) for s in sets}) > 1:
        raise ValueError("concat pooling needs sets of equal size; use mean or max for varying sizes")
    return np.stack([pool_set(s, pooling) for s in sets])


def covariance_trace(members: np.ndarray) -> float:
    """Trace of the covariance of a set's member embeddings: how spread out the set is."""
    members = np.asarray(members, dtype=np.float64)
    if members.ndim != 2 or len(members) < 2:
        raise ValueError(f"covariance needs a (M >= 2, D) set, got shape {members.shape}")
    return float(members.var(axis=0, ddof=1).sum())


class SetDetector(ThresholdedScores, OutlierMixin, BaseEstimator):
    """DN2 on sets of embeddings: pool each set, then :class:`~dn2.KNNDetector` on the pooled vectors."""

    def __init__(self, pooling: str = "mean", k: int = 2, clean: float = 0.0, contamination: float | None = None, fpr: float = 0.05):
        self.pooling = pooling
        self.k = k
        self.clean = clean
        self.contamination = contamination
        self.fpr = fpr

    def fit(self, sets: Sequence[np.ndarray], y: Any = None) -> "SetDetector":
        self.detector_ = KNNDetector(k=self.k, clean=self.clean, contamination=self.contamination, fpr=self.fpr)
        self.detector_.fit(pool_sets(sets, self.pooling))
        self.threshold_, self.offset_ = self.detector_.threshold_, self.detector_.offset_
        return self

    def anomaly_score(self, sets: Sequence[np.ndarray]) -> np.ndarray:
        """Mean distance of each pooled set to its k nearest pooled normal sets."""
        return self.detector_.anomaly_score(pool_sets(sets, self.pooling))



class GroupDN2(SetDetector):
    """Group anomaly detection on images: each set is a sequence of images (paths, PIL, arrays).

    Example:
        >>> from dn2.group import GroupDN2
        >>> model = GroupDN2(pooling="mean").fit([["a1.jpg", "a2.jpg"], ["b1.jpg", "b2.jpg"]])  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = None,
        pooling: str = "mean",
        k: int = 2,
        clean: float = 0.0,
        contamination: float | None = None,
        fpr: float = 0.05,
        batch_size: int | None = None,
        precision: str = "auto",
        progress: bool = True,
    ):
        super().__init__(pooling=pooling, k=k, clean=clean, contamination=contamination, fpr=fpr)
        self.backbone = backbone
        self.weights = weights
        self.batch_size = batch_size
        self.precision = precision
        self.progress = progress

    def _embed_sets(self, sets: Sequence[Sequence[Any]]) -> list[np.ndarray]:
        """Embed all members with the fitted embedder in one pass, then split back into sets."""
        if not hasattr(self, "embedder_"):
            raise NotFittedError("this GroupDN2 is not fitted yet: call fit first")
        sizes = [len(s) for s in sets]
        if not sizes or min(sizes) == 0:
            raise ValueError("every set must hold at least one image")
        flat = [member for s in sets for member in s]
        vectors = self.embedder_.transform(flat)
        return np.split(vectors, np.cumsum(sizes)[:-1])

    def fit(self, sets: Sequence[Sequence[Any]], y: Any = None) -> "GroupDN2":
        """Load the backbone named by the current parameters (every fit: ``set_params`` takes effect), embed, fit.

        With ``precision="int8"`` the backbone is quantised on a sample of the training sets' members."""
        self.embedder_ = Embedder(
            backbone=self.backbone, weights=self.weights, batch_size=self.batch_size,
            precision=self.precision, progress=self.progress,
        ).fit([member for s in sets for member in s])
        return super().fit(self._embed_sets(sets))

    def anomaly_score(self, sets: Sequence[Sequence[Any]]) -> np.ndarray:
        return super().anomaly_score(self._embed_sets(sets))
