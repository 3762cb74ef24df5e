"""Localisation metrics: image ROCAUC, pixel ROCAUC and PRO (MVTec AD's per-region overlap, Bergmann et al. 2020).

- :func:`auroc`: the Mann-Whitney statistic with tied scores counted half (= ROCAUC), by one sort.
- :class:`PixelMetrics`: pixel ROCAUC and PRO of maps against ground-truth masks, accumulated one image
  at a time in fixed memory, whatever the number of pixels (MTD's test set has 51 M, MVTec's up to
  100 M per category). Normal pixels go into a histogram of ``bins`` equal bins over [low, high];
  defect pixels into a histogram and into a second one weighted by 1 / (size of their connected
  region) (8-connectivity, as MVTec's evaluation). A pixel is called anomalous when its value is >= a
  threshold t; at every bin edge t, FPR(t) is the normal pixels' share at or above t and PRO(t) the
  weighted defect share / number of regions, i.e. the mean over regions of the share of each region's
  pixels at or above t. The PRO curve (FPR, PRO) from t = +inf down is integrated with the trapezoid
  rule up to FPR = ``max_fpr`` (interpolated there) and divided by ``max_fpr`` (1 is perfect).
  Values in one bin count as tied: with 2^20 bins the results equal the exact ones (every distinct
  value a threshold) whenever distinct values fall in distinct bins, as tests check against brute force.

Example:
    >>> import numpy as np
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> mask = np.zeros((4, 4), bool); mask[1:3, 1:3] = True
    >>> metrics = PixelMetrics(0.0, 1.0)
    >>> metrics.add(mask, mask * 0.9 + 0.05)
    >>> metrics.pixel_auroc(), metrics.pro()
    (1.0, 1.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["EIGHT_CONNECTED", "PixelMetrics", "auroc", "regions"]

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def auroc(labels: Any, scores: Any) -> float:
    """ROCAUC of ``scores`` (higher = more anomalous) for boolean ``labels``; ties count half; NaN if one class is absent."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels for {len(s)} scores")
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions of a mask (8-connectivity): (label image, 0 = background; number of regions)."""
    labelled, n = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    return labelled, int(n)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y), x non-decreasing, from x[0] to x_max (interpolated at x_max)."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if not inside.all():
        i = int(np.argmin(inside))  # the first point past x_max
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        xs, ys = np.r_[xs, x_max], np.r_[ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


class PixelMetrics:
    """Pixel ROCAUC and PRO of anomaly maps against masks, one image at a time (see the module docstring).

    ``low``/``high`` bound the map values (values outside fall into the end bins: give bounds that hold
    them all, e.g. the smallest and largest grid values, which a map's interpolation never exceeds).
    Memory: three float64 histograms of ``bins`` entries (24 MiB at 2^20).
    """

    def __init__(self, low: float, high: float, bins: int = 2**20):
        if not (np.isfinite(low) and np.isfinite(high)) or high < low:
            raise ValueError(f"PixelMetrics needs finite bounds low <= high, got {low}, {high}")
        self.low, self.high, self.bins = float(low), float(high) if high > low else float(low) + 1.0, int(bins)
        self.normal = np.zeros(self.bins)
        self.defect = np.zeros(self.bins)
        self.region_weight = np.zeros(self.bins)
        self.n_regions = 0

    def _bin(self, values: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(values, dtype=np.float64) - self.low) * (self.bins / (self.high - self.low))
        return np.clip(scaled, 0, self.bins - 1).astype(np.int64)

    def add(self, mask: np.ndarray, scores: np.ndarray) -> None:
        """Add one image: its ground-truth ``mask`` (H, W) bool and its map ``scores`` (H, W)."""
        mask = np.asarray(mask, dtype=bool)
        scores = np.asarray(scores)
        if mask.shape != scores.shape:
            raise ValueError(f"mask {mask.shape} and map {scores.shape} differ in size")
        if not np.isfinite(scores).all():
            raise ValueError("the map holds NaN or infinite values")
        self.normal += np.bincount(self._bin(scores[~mask]), minlength=self.bins)
        if mask.any():
            labelled, n = regions(mask)
            inside = labelled[mask]
            sizes = np.bincount(inside)
            b = self._bin(scores[mask])
            self.defect += np.bincount(b, minlength=self.bins)
            self.region_weight += np.bincount(b, weights=1.0 / sizes[inside], minlength=self.bins)
            self.n_regions += n

    def pixel_auroc(self) -> float:
        """ROCAUC of defect vs normal pixels (NaN without both)."""
        n0, n1 = self.normal.sum(), self.defect.sum()
        if n0 == 0 or n1 == 0:
            return float("nan")
        below = np.cumsum(self.normal) - self.normal  # normal pixels in lower bins
        return float((self.defect * (below + 0.5 * self.normal)).sum() / (n0 * n1))

    def pro(self, max_fpr: float = 0.3) -> float:
        """The normalised area under the PRO curve up to ``max_fpr`` (NaN without defects or normal pixels)."""
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        n0 = self.normal.sum()
        if n0 == 0 or self.n_regions == 0:
            return float("nan")
        fpr = np.r_[0.0, np.cumsum(self.normal[::-1]) / n0]
        overlap = np.r_[0.0, np.cumsum(self.region_weight[::-1]) / self.n_regions]
        return _trapezoid_to(fpr, overlap, max_fpr) / max_fpr
