"""Localisation metrics (dn2.maps.metrics) against brute force on small generated masks and maps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dn2.maps.metrics import PixelMetrics, auroc


def brute_force_auroc(y, s) -> float:
    y, s = np.asarray(y, bool).ravel(), np.asarray(s, float).ravel()
    p, n = s[y], s[~y]
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n)))


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions by an explicit flood fill (independent of scipy)."""
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(region)
    return out


def brute_force_pro(masks, maps, max_fpr) -> float:
    """Every distinct value a threshold (score >= t is anomalous); PRO(t) the mean over regions of their
    share above t; trapezoid from FPR 0 to max_fpr, interpolated there, divided by max_fpr."""
    regions = [(i, r) for i, m in enumerate(masks) for r in components(m)]
    n_normal = sum(int((~m).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for s in maps for v in s.ravel()}, reverse=True):
        fp = sum(int(((s >= t) & ~m).sum()) for s, m in zip(maps, masks))
        overlap = [sum(maps[i][y, x] >= t for y, x in r) / len(r) for i, r in regions]
        points.append((fp / n_normal, sum(overlap) / len(overlap)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1, x1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0), max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_case(rng: np.random.Generator, integer: bool):
    masks, maps = [], []
    for i in range(int(rng.integers(1, 4))):
        h, w = (int(v) for v in rng.integers(3, 9, 2))
        m = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):  # small rectangles, some touching only diagonally
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = True
        if i == 0 and rng.random() < 0.3:
            m[:] = False  # an image without defects
        s = (rng.integers(0, 8, (h, w)) if integer else rng.random((h, w))).astype(float) + m * rng.random()
        masks.append(m)
        maps.append(s)
    masks[0][0, 0] = True  # at least one defect pixel
    masks[-1][-1, -1] = False  # and one normal pixel
    return masks, maps


@pytest.mark.parametrize("trial", range(40))
def test_pixel_auroc_and_pro_equal_brute_force(trial):
    rng = np.random.default_rng(trial)
    masks, maps = random_case(rng, integer=trial % 2 == 1)  # with and without ties
    metrics = PixelMetrics(min(s.min() for s in maps), max(s.max() for s in maps))
    for m, s in zip(masks, maps):
        metrics.add(m, s)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([x.ravel() for x in maps])
    assert metrics.pixel_auroc() == pytest.approx(brute_force_auroc(y, s), abs=1e-12)
    for max_fpr in (0.3, 1.0):
        assert metrics.pro(max_fpr) == pytest.approx(brute_force_pro(masks, maps, max_fpr), abs=1e-12)


def test_a_diagonal_touch_is_one_region():
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = True
    s = np.zeros((4, 4))
    s[0, 0] = 1.0  # half of the one region found at once, no false positive
    metrics = PixelMetrics(0.0, 1.0)
    metrics.add(m, s)
    assert metrics.n_regions == 1
    assert metrics.pro(1.0) == pytest.approx(brute_force_pro([m], [s], 1.0))


def test_auroc_with_ties_equals_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(50):
        y = rng.random(40) < 0.4
        y[:2] = [True, False]
        s = rng.integers(0, 5, 40).astype(float) if trial % 2 else rng.random(40)
        assert auroc(y, s) == pytest.approx(brute_force_auroc(y, s), abs=1e-12)
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc([1, 1], [0.1, 0.2]))


def test_perfect_and_useless_maps():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    perfect, flat = PixelMetrics(0, 1), PixelMetrics(0, 1)
    perfect.add(mask, mask.astype(float))
    flat.add(mask, np.full((10, 10), 0.5))
    assert perfect.pixel_auroc() == 1.0 and perfect.pro() == pytest.approx(1.0)
    assert flat.pixel_auroc() == 0.5 and flat.pro() == pytest.approx(0.15)  # one jump to FPR 1: the diagonal, 0.3 / 2
    with pytest.raises(ValueError, match="differ in size"):
        perfect.add(mask, np.zeros((9, 10)))
    assert np.isnan(PixelMetrics(0, 1).pro())
