"""``dn2 bench localize``: anomaly maps against ground-truth masks, per defect type, with cost.

For each map method and backbone asked, a :class:`dn2.DN2` model with maps is fitted on the normal
training images of a :class:`dn2.datasets.MaskedDataset` (MVTec AD category, Magnetic Tile Defects)
and scores the test images once; from that one pass come

- per defect type (its images against every normal test image), their mean, and all test images:
  image ROCAUC of each image score (image-level DN2, the map's, their combination), pixel ROCAUC and
  PRO up to FPR 0.3 (:mod:`dn2.maps.metrics`, at the original resolution of every image);
- fit and score wall time, peak resident memory of each phase, and the model file's size;
- a figure of example maps: the defective images whose map ranks their defect pixels best, typically
  (median) and worst (per-image pixel ROCAUC), beside their ground truth;
- every test image's scores (``scores_<method>_<backbone>.csv``) for later analysis.

Masks are checked (readable, one channel, some defect pixel) before anything is fitted, and their
size against their image's when they are used.

Example:
    >>> from dn2.datasets import load_dataset
    >>> tables, figures = localize(load_dataset("magnetic-tile-defects.zip"), ["spade"], ["efficientnet_lite2"])  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..datasets import MaskedDataset, MaskSource, subset
from ..detector import DN2
from ..images import printable
from ..maps.metrics import PixelMetrics, auroc
from ..review.overlay import overlay
from ..settings import IMAGE_SCORES, PRESETS
from .report import Table

__all__ = ["LocalizeResult", "check_masks", "limit_masked", "localize", "peak_memory"]

PIXEL_BINS = 2**18  # histogram bins of the pixel metrics: 2 MiB each, far finer than map differences that matter


def peak_memory(reset: bool = False) -> float:
    """Peak resident memory of this process in MiB since the last reset (Linux: ``/proc/self/clear_refs``);
    where it cannot be reset, since the process started."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_masks(ds: MaskedDataset) -> list[str]:
    """Read every mask once (readable, one channel, some defect pixel unless the dataset allows empty ones):
    errors name the mask, before any work. Returns the names of the empty defect masks allowed."""
    empty = []
    for i in range(len(ds.masks)):
        mask = ds.masks.load(i, None)
        if ds.masks.files[i] is not None and not mask.any():
            empty.append(ds.masks.name(i))
    return empty


def limit_masked(ds: MaskedDataset, max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> MaskedDataset:
    """A smaller copy for quick runs: at most ``max_train`` training images and ``max_test`` test images
    (random, in their order; each defect type keeps at least one image when it can)."""
    rng = np.random.default_rng(seed)
    train, test, masks = ds.train, ds.test, ds.masks
    if max_train is not None and max_train < len(train):
        train = subset(train, np.sort(rng.permutation(len(train))[:max_train]))
    if max_test is not None and max_test < len(test):
        first = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)]
        rest = [i for i in rng.permutation(len(test)) if i not in first]
        keep = np.sort(np.array((first + rest)[:max(max_test, len(first))], dtype=np.int64))
        test = subset(test, keep)
        masks = MaskSource([masks.files[i] for i in keep], masks.archive, masks.allow_empty)
    return MaskedDataset(ds.name, ds.classes, train, test, masks=masks, normal=ds.normal)


@dataclass
class LocalizeResult:
    """One method x backbone: its tables (per type; every image's scores), the example figure, and the cost."""

    method: str
    backbone: str
    per_type: Table
    scores: Table
    figure: bytes | None
    summary: dict[str, Any]


def _model_size_mib(model: DN2) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = model.save(Path(folder) / "model.dn2")
        return os.path.getsize(path) / 2**20


def _figure(ds: MaskedDataset, picks: list[tuple[str, int, float]], heats: dict[int, np.ndarray], threshold: float,
            title: str) -> bytes | None:
    """Rows of (image, map overlay, ground truth) for the picked test images, as PNG bytes (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False, dpi=100)
    for (label, i, value), row in zip(picks, axes):
        image = ds.test.source.load(i)
        heat = heats[i]
        mask = ds.masks.load(i, heat.shape)
        shown = [image, overlay(image, heat, threshold), overlay(image, mask.astype(np.float32) * 2.0, 1.0)]
        names = [f"{label}: {printable(ds.test.source.name(i))}", f"map (pixel ROCAUC {100 * value:.1f}%)", "ground truth"]
        for ax, im, name in zip(row, shown, names):
            ax.imshow(im)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def localize_one(ds: MaskedDataset, method: str, backbone: str | None, *, preset: str = "best",
                 echo: Callable[[str], None] = print, **model_options: Any) -> LocalizeResult:
    """Fit and score one model with maps (``model_options`` go to :class:`dn2.DN2`) and evaluate it.

    A weights file is one backbone's: the image level then uses the map backbone too."""
    if model_options.get("weights") not in (None, "random"):
        model_options.setdefault("backbone", backbone or PRESETS[preset].map_backbone)
    model = DN2(preset=preset, maps=method, map_backbone=backbone, **model_options)
    model.check_params()
    peak_memory(reset=True)
    start = time.perf_counter()
    model.fit(ds.train.source)
    fit_seconds, fit_peak = time.perf_counter() - start, peak_memory()
    backbone = model.method_.map_backbone
    echo(f"{method} {backbone}: fitted on {len(model.detector.kept_)} images in {fit_seconds:.1f} s "
         f"(peak {fit_peak:.0f} MiB); {len(model.maps_.memory.patches):,} patches kept")
    peak_memory(reset=True)
    start = time.perf_counter()
    results = list(model.localize(ds.test.source))
    score_seconds, score_peak = time.perf_counter() - start, peak_memory()
    echo(f"{method} {backbone}: scored {len(results)} images in {score_seconds:.1f} s (peak {score_peak:.0f} MiB)")

    if not results:
        raise ValueError(f"{ds.name}: no test image could be read")
    maps = model.maps_
    index = np.array([r.index for r in results], dtype=np.int64)
    labels = ds.test.labels[index]
    dn2_scores = np.array([r.dn2_score for r in results])
    map_scores = np.array([r.map_score for r in results])
    by_rule = {rule: maps.combine(dn2_scores, map_scores, rule) for rule in IMAGE_SCORES}
    low = min(float(r.grid.min()) for r in results)
    high = max(float(r.grid.max()) for r in results)
    types = [c for c in range(len(ds.classes)) if c != ds.normal and (labels == c).any()]
    if not types:
        raise ValueError(f"{ds.name}: no defective test image was read: nothing to localise")
    pixels = {c: PixelMetrics(low, high, PIXEL_BINS) for c in [*types, "all"]}
    per_image: list[tuple[float, int]] = []
    flagged = np.zeros(4, dtype=np.int64)  # normal pixels of defect-free images: flagged, all; defect pixels: same
    for r, label in zip(results, labels):
        heat = r.map()
        mask = ds.masks.load(r.index, heat.shape)
        above = heat > maps.pixel_threshold
        if label == ds.normal:
            flagged[:2] += int(above.sum()), above.size
        flagged[2:] += int(above[mask].sum()), int(mask.sum())
        for key in (types if label == ds.normal else [label]) + ["all"]:
            pixels[key].add(mask, heat)
        if label != ds.normal and mask.any() and not mask.all():  # one class only: no pixel ROCAUC
            per_image.append((auroc(mask.ravel(), heat.ravel()), r.index))

    def row(name: str, chosen: np.ndarray, metrics: PixelMetrics) -> list[Any]:
        y = labels[chosen] != ds.normal
        return [name, int(y.sum()), *[100 * auroc(y, by_rule[rule][chosen]) for rule in IMAGE_SCORES],
                100 * metrics.pixel_auroc(), 100 * metrics.pro()]

    rows = [row(ds.classes[c], (labels == ds.normal) | (labels == c), pixels[c]) for c in types]
    mean = ["mean", int(sum(r[1] for r in rows))] + [float(np.mean([r[j] for r in rows])) for j in range(2, len(rows[0]))]
    overall = row("all", np.ones(len(labels), dtype=bool), pixels["all"])
    columns = ["defect type", "defective images", *[f"image ROCAUC % ({rule})" for rule in IMAGE_SCORES],
               "pixel ROCAUC %", "PRO %"]
    stem = f"{method}_{backbone.replace('+', '-')}"
    per_type = Table(f"localize_{stem}", f"{ds.name}: {method} maps on {backbone} (default image score: dn2)",
                     columns, [*rows, mean, overall],
                     notes=[f"{len(labels) - int((labels != ds.normal).sum())} normal test images in every row; "
                            f"pixel metrics at each image's original size; PRO up to FPR 0.3",
                            f"pixel threshold (training leave-one-out, q=0.99): {maps.pixel_threshold:.4f}"])
    score_rows = [[r.name, ds.classes[label], r.dn2_score, r.map_score, float(by_rule["combined"][j])]
                  for j, (r, label) in enumerate(zip(results, labels))]
    scores = Table(f"scores_{stem}", f"{ds.name}: every test image's scores ({method}, {backbone})",
                   ["image", "class", "dn2 score", "map score", "combined score"], score_rows)
    per_image.sort()
    figure = None
    if per_image:
        picks = [("best", per_image[-1]), ("typical", per_image[len(per_image) // 2]), ("worst", per_image[0])]
        heats = {i: next(r for r in results if r.index == i).map() for _, (_, i) in picks}
        figure = _figure(ds, [(label, i, value) for label, (value, i) in picks], heats, maps.pixel_threshold,
                         f"{ds.name}: {method} maps on {backbone}: best, typical and worst defective image")
    summary = {"method": method, "backbone": backbone, **{f"image {rule}": overall[2 + j] for j, rule in enumerate(IMAGE_SCORES)},
               "pixel": overall[-2], "PRO": overall[-1],
               "threshold FPR %": 100 * flagged[0] / max(flagged[1], 1), "threshold TPR %": 100 * flagged[2] / max(flagged[3], 1),
               "fit s": fit_seconds, "score s": score_seconds,
               "fit peak MiB": fit_peak, "score peak MiB": score_peak, "model MiB": _model_size_mib(model),
               "precision": model.method_.precision}
    return LocalizeResult(method, backbone, per_type, scores, figure, summary)


def localize(ds: MaskedDataset, methods: Sequence[str], backbones: Sequence[str | None], *,
             echo: Callable[[str], None] = print, **model_options: Any) -> tuple[list[Table], list[tuple[str, str, bytes]]]:
    """Every method x backbone on ``ds``: (tables: summary first, then per type and per image; figures)."""
    if not isinstance(ds, MaskedDataset):
        raise ValueError(f"dn2 bench localize needs a dataset with ground-truth masks (MVTec AD category, "
                         f"Magnetic Tile Defects), got {ds.name!r} without masks")
    empty = check_masks(ds)
    if empty:
        echo(f"note: {len(empty)} defect masks mark no pixel (allowed for {ds.name}): {', '.join(empty)}")
    results = [localize_one(ds, m, b, echo=echo, **model_options) for m in methods for b in backbones]
    keys = list(results[0].summary)
    summary = Table("localize", f"{ds.name}: anomaly maps, all test images", keys,
                    [[r.summary[k] for k in keys] for r in results],
                    notes=["image ROCAUC per image score: dn2 (image-level, the default), map (largest patch "
                           "distance), combined (sum of z-scores vs training leave-one-out)",
                           "threshold FPR: share of the pixels of defect-free test images above the pixel threshold "
                           "(set at the training leave-one-out 99th percentile: 1% if test images resemble training "
                           "images); threshold TPR: share of defect pixels above it",
                           "times are wall clock on this machine (see the CPU and load printed with the run); "
                           "peak: resident memory of the process during each phase"]
                    + ([f"{len(empty)} defective test images have masks marking no pixel (as distributed)"] if empty else []))
    tables = [summary] + [t for r in results for t in (r.per_type, r.scores)]
    figures = [(f"examples_{r.method}_{r.backbone.replace('+', '-')}",
                f"{ds.name}: example maps of {r.method} on {r.backbone}: best, typical and worst defective image", r.figure)
               for r in results if r.figure is not None]
    return tables, figures
