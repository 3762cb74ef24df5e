"""The map part of a fitted DN2 model: patch networks + memory + thresholds set without labels.

:func:`fit_maps` streams the kept training images through the patch networks
(:mod:`~dn2.maps.patches`) into a memory (:mod:`~dn2.maps.memory`), then scores a sample of
:data:`N_LOO_IMAGES` training images *leave-one-image-out* (each without its own patches) to set

- the pixel threshold: the :data:`PIXEL_QUANTILE` quantile of their pooled map values, so about 1% of
  the pixels of new normal images exceed it if they resemble the training images (measured on MTD in
  BENCHMARKS.md, "Anomaly maps"; more under an unseen acquisition session);
- the statistics of the map's image score (mean, std of their largest patch distance) for the
  combined score: each score minus its training leave-one-out mean, over its std, summed
  (``image_score="combined"``; the DN2 part uses the leave-one-out scores of every kept training image);
- the image threshold of ``image_score="map"`` or ``"combined"``: the ``1 - fpr`` quantile of those
  scores (with ``image_score="dn2"`` the image-level detector's threshold is used as before).

:meth:`MapModel.score` gives, per image, the grid of nearest-patch distances, the map's score and the
image score; :meth:`Localization.map` makes the full-resolution map. The image-level side (the embedding
index, which SPADE asks for each image's nearest training images) is passed in by the caller
(:class:`dn2.DN2`): this module does not import the detector.

Example:
    >>> import numpy as np
    >>> from dn2.maps.model import weighted_quantile
    >>> weighted_quantile(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0]), 0.5)
    2.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..search import Index
from .memory import PatchCoreMemory, SpadeMemory, grid_to_map, make_memory, restore_memory
from .patches import PatchNet, patch_batches

__all__ = ["LOO_VALUES_PER_IMAGE", "Localization", "MapModel", "N_LOO_IMAGES", "PIXEL_QUANTILE", "fit_maps",
           "loo_sample", "weighted_quantile"]

#: Training images scored leave-one-out for the thresholds: enough for a stable 0.99 quantile
#: (docs/research/maps.md, Q5); the pass costs about as much as scoring that many new images.
N_LOO_IMAGES = 60
#: The pixel threshold's quantile of leave-one-out map values: about 1% of normal pixels flagged.
#: Higher quantiles were set by a handful of odd training images and unusable (docs/research/maps.md, Table 6).
PIXEL_QUANTILE = 0.99
#: Map values kept per leave-one-out image for the pooled quantile: a regular sub-grid of the smooth
#: map, each value weighted by the pixels it stands for, so large images count as much as their pixels.
LOO_VALUES_PER_IMAGE = 65536


def loo_sample(n: int, size: int = N_LOO_IMAGES) -> np.ndarray:
    """``min(n, size)`` evenly spaced positions in ``range(n)`` (sorted, unique).

    Example:
        >>> loo_sample(10, 4).tolist()
        [0, 3, 6, 9]
    """
    return np.unique(np.linspace(0, n - 1, min(n, size)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight reaches ``q`` of the total (a weighted lower quantile)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    i = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(np.asarray(values)[order][min(i, len(order) - 1)])


def _stats(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (1 when the values do not vary, so a z-score stays finite)."""
    std = float(np.std(values))
    return float(np.mean(values)), std if std > 0 else 1.0


@dataclass
class Localization:
    """One image's result: its ``name``, ``image_score`` (by the model's rule), ``dn2_score`` (image-level),
    ``map_score`` (the largest value of ``grid``, the (h, w) nearest-patch distances; the full-resolution
    map never exceeds it), the original ``size`` (H, W), ``row`` (its position among the images scored)
    and ``index`` (its position in the source)."""

    name: str
    image_score: float
    dn2_score: float
    map_score: float
    grid: np.ndarray
    size: tuple[int, int]
    row: int
    index: int

    def map(self) -> np.ndarray:
        """The anomaly map at the original image's (H, W), float32 (:func:`~dn2.maps.memory.grid_to_map`)."""
        return grid_to_map(self.grid, self.size)


class MapModel:
    """A fitted map model (see the module docstring); made by :func:`fit_maps` or :meth:`from_state`."""

    def __init__(self, nets: list[PatchNet], memory: SpadeMemory | PatchCoreMemory, *, k: int, image_score: str,
                 scales: np.ndarray, n_images: int, loo_map: np.ndarray, loo_dn2: np.ndarray, dn2_stats: tuple[float, float],
                 pixel_threshold: float, image_threshold: float | None):
        self.nets = nets
        self.memory = memory
        self.k = k
        self.image_score = image_score
        self.scales = np.asarray(scales, dtype=np.float32)
        self.n_images = n_images
        self.loo_map = np.asarray(loo_map, dtype=np.float32)
        self.loo_dn2 = np.asarray(loo_dn2, dtype=np.float32)
        self.dn2_stats = dn2_stats
        self.map_stats = _stats(self.loo_map)
        self.pixel_threshold = float(pixel_threshold)
        self.image_threshold = image_threshold
        self.has_patches = memory.has_patches(n_images)

    @property
    def dims(self) -> list[int]:
        return [net.dim for net in self.nets]

    def scaled(self, features: np.ndarray) -> np.ndarray:
        """Each backbone's columns divided by its scale (an ensemble's parts then weigh about the same)."""
        if len(self.nets) == 1:
            return features
        return features / np.repeat(self.scales, self.dims).astype(np.float32)

    def combine(self, dn2_score: np.ndarray, map_score: np.ndarray, rule: str | None = None) -> np.ndarray:
        """The image score by ``rule`` (default: the model's ``image_score``) from the image-level and the map's scores."""
        rule = rule or self.image_score
        if rule == "dn2":
            return np.asarray(dn2_score, dtype=np.float64)
        if rule == "map":
            return np.asarray(map_score, dtype=np.float64)
        (m1, s1), (m2, s2) = self.dn2_stats, self.map_stats
        return (np.asarray(dn2_score, np.float64) - m1) / s1 + (np.asarray(map_score, np.float64) - m2) / s2

    def neighbours(self, image_index: Index, embeddings: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """SPADE: the ``k`` nearest training images (with patches) of each embedding, by the image-level index;
        ``exclude[i]`` is left out of row i's (leave-one-out). Fewer training images: all of them."""
        available = int(self.has_patches.sum()) - (exclude is not None)
        k = min(self.k, available)
        if k < 1:
            raise ValueError("maps: SPADE needs another training image with patches")
        missing = int((~self.has_patches).sum())
        ask = min(image_index.ntotal, k + missing + (exclude is not None))
        _, idx = image_index.search(np.ascontiguousarray(embeddings, dtype=np.float32), ask)
        out = np.empty((len(idx), k), dtype=np.int64)
        for i, row in enumerate(idx):
            keep = row[(row >= 0) & (row < self.n_images)]
            keep = keep[self.has_patches[keep]]
            if exclude is not None:
                keep = keep[keep != exclude[i]]
            if len(keep) < k:
                raise ValueError("maps: the image-level index returned too few training images")
            out[i] = keep[:k]
        return out

    def score(self, images: Any, *, names: Sequence[str], dn2_scores: np.ndarray, indices: Sequence[int] | None = None,
              image_index: Index | None = None, embeddings: np.ndarray | None = None, skipped: list[str] | None = None,
              **run: Any) -> Iterator[Localization]:
        """Score images (those at ``indices`` of the source) one batch at a time: a :class:`Localization` each.

        ``names``, ``dn2_scores`` (and for SPADE the transformed image-level ``embeddings`` with the
        ``image_index`` they are searched in) are aligned with the images scored. Images that cannot be
        read (only with ``skip_bad`` in ``run``) are left out and their messages appended to ``skipped``.
        ``run``: the run options of :func:`~dn2.maps.patches.patch_batches`.
        """
        neighbours = None
        if isinstance(self.memory, SpadeMemory):
            if image_index is None or embeddings is None:
                raise ValueError("maps: SPADE scoring needs the image-level index and embeddings")
            neighbours = self.neighbours(image_index, embeddings)
        h, w = self.nets[0].grid
        positions = None if indices is None else np.asarray(indices, dtype=np.int64)
        for batch in patch_batches(self.nets, images, indices=indices, desc="maps", skipped=skipped, **run):
            features = self.scaled(batch.features).reshape(len(batch.rows), h * w, -1)
            if neighbours is None:  # one search for the whole batch
                grids = self.memory.distances(features.reshape(-1, features.shape[-1])).reshape(-1, h, w)
            else:
                grids = np.stack([self.memory.distances(f, neighbours[r]) for f, r in zip(features, batch.rows)])
                grids = grids.reshape(-1, h, w)
            map_scores = grids.reshape(len(grids), -1).max(axis=1)
            image_scores = self.combine(np.asarray(dn2_scores)[batch.rows], map_scores)
            for row, grid, size, m, s in zip(batch.rows, grids, batch.sizes, map_scores, image_scores):
                index = int(row) if positions is None else int(positions[row])
                yield Localization(names[row], float(s), float(dn2_scores[row]), float(m), grid.astype(np.float32), size,
                                   int(row), index)

    # -- persistence ------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(header, tensors) as stored in model files under "maps" and ``maps/``."""
        header = {"nets": [net.identity() for net in self.nets], "memory": self.memory.header(),
                  "n_images": self.n_images, "dn2_stats": list(self.dn2_stats),
                  "pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold}
        tensors = {f"maps/{key}": value for key, value in self.memory.state().items()}
        tensors.update({"maps/scales": self.scales, "maps/loo_map": self.loo_map, "maps/loo_dn2": self.loo_dn2})
        return header, tensors

    @classmethod
    def from_state(cls, header: Mapping[str, Any], tensors: Mapping[str, np.ndarray], nets: list[PatchNet], *,
                   k: int, image_score: str) -> "MapModel":
        """Rebuild a fitted map model from :meth:`to_state` and the patch networks of its method, checking
        every field (``ValueError`` naming it): the networks must be the ones it was fitted with."""
        if not isinstance(header, Mapping):
            raise ValueError("maps header must be a mapping")
        stored = header.get("nets")
        ours = [net.identity() for net in nets]
        if stored != ours:
            raise ValueError(f"maps: patch networks differ from those the model was fitted with "
                             f"(stored {stored!r}, loaded {ours!r}); pass the original weights")
        unknown = set(header) - {"nets", "memory", "n_images", "dn2_stats", "pixel_threshold", "image_threshold"}
        if unknown:
            raise ValueError(f"unknown maps fields {sorted(unknown)}")
        if (image_score == "dn2") != (header.get("image_threshold") is None):
            raise ValueError(f"maps image_threshold must be null exactly when the image score is 'dn2' "
                             f"(image score {image_score!r}, image_threshold {header.get('image_threshold')!r})")
        n_images = header.get("n_images")
        if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 2:
            raise ValueError(f"maps n_images must be an integer >= 2, got {n_images!r}")
        numbers = {name: header.get(name) for name in ("pixel_threshold", "image_threshold")}
        for name, value in numbers.items():
            if value is None and name == "image_threshold" and image_score == "dn2":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"maps {name} must be a finite number, got {value!r}")
        stats = header.get("dn2_stats")
        if not (isinstance(stats, list) and len(stats) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                      and np.isfinite(v) for v in stats) and stats[1] > 0):
            raise ValueError(f"maps dn2_stats must be [mean, std > 0], got {stats!r}")
        arrays = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("maps/")}
        dim = sum(net.dim for net in nets)
        memory = restore_memory(header.get("memory"), arrays, dim, n_images)
        vectors = {}
        for name, length in (("scales", len(nets)), ("loo_map", None), ("loo_dn2", None)):
            a = arrays.get(name)
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1 or not np.isfinite(a).all() \
                    or (length is not None and len(a) != length) or len(a) == 0:
                raise ValueError(f"tensor 'maps/{name}' must be a finite 1-D float32 array"
                                 + (f" of {length}" if length else ""))
            vectors[name] = a
        if len(vectors["loo_map"]) != len(vectors["loo_dn2"]):
            raise ValueError("tensors 'maps/loo_map' and 'maps/loo_dn2' differ in length")
        if (vectors["scales"] <= 0).any():
            raise ValueError("tensor 'maps/scales' must be positive")
        return cls(nets, memory, k=k, image_score=image_score, scales=vectors["scales"], n_images=n_images,
                   loo_map=vectors["loo_map"], loo_dn2=vectors["loo_dn2"], dn2_stats=(float(stats[0]), float(stats[1])),
                   pixel_threshold=float(numbers["pixel_threshold"]),
                   image_threshold=None if numbers["image_threshold"] is None else float(numbers["image_threshold"]))


def _part_scales(nets: list[PatchNet], features: np.ndarray) -> np.ndarray:
    """Mean length of each backbone's part of the location vectors (features (n, h, w, D))."""
    if len(nets) == 1:
        return np.ones(1, dtype=np.float32)
    edges = np.cumsum([0] + [net.dim for net in nets])
    flat = features.reshape(-1, features.shape[-1])
    return np.array([np.linalg.norm(flat[:, a:b], axis=1).mean() for a, b in zip(edges[:-1], edges[1:])],
                    dtype=np.float32)


def fit_maps(nets: list[PatchNet], images: Any, positions: Sequence[int], *, method: str, fraction: float, k: int,
             image_score: str, image_index: Index | None, image_memory: np.ndarray | None, dn2_loo: np.ndarray,
             rate: float, index: str = "exact", index_params: Mapping[str, Any] | None = None,
             **run: Any) -> MapModel:
    """Fit the maps on the kept training images (``positions`` in the source, in the order of ``dn2_loo``,
    their image-level leave-one-out scores; for SPADE, also of ``image_memory``, the rows of ``image_index``).

    ``rate``: the target false-positive rate of the image threshold. ``index``/``index_params``: the
    search of PatchCore's bank. ``run``: the run options of :func:`~dn2.maps.patches.patch_batches`.
    """
    n = len(positions)
    if n < 2:
        raise ValueError(f"maps need at least 2 training images, got {n}")
    memory = make_memory(method, fraction, index, index_params)
    sample = set(loo_sample(n).tolist())
    kept: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
    scales = None
    h, w = nets[0].grid
    for batch in patch_batches(nets, images, indices=positions, desc="maps (fit)", **run):
        if scales is None:
            scales = _part_scales(nets, batch.features)
        features = batch.features if len(nets) == 1 else batch.features / np.repeat(scales, [n.dim for n in nets])
        for row, f, size in zip(batch.rows, features, batch.sizes):
            patches = np.ascontiguousarray(f.reshape(h * w, -1), dtype=np.float32)
            memory.add(int(row), patches)
            if int(row) in sample:
                kept[int(row)] = (patches, size)
    memory.finish()
    dn2_loo = np.asarray(dn2_loo, dtype=np.float32)
    model = MapModel(nets, memory, k=k, image_score=image_score, scales=scales, n_images=n, loo_map=np.zeros(1),
                     loo_dn2=np.zeros(1), dn2_stats=_stats(dn2_loo), pixel_threshold=0.0, image_threshold=None)
    if model.has_patches.sum() < 2:
        raise ValueError("maps need at least 2 training images with patches")
    rows = np.array(sorted(kept), dtype=np.int64)
    neighbours = None
    if isinstance(memory, SpadeMemory):
        neighbours = model.neighbours(image_index, np.asarray(image_memory)[rows], exclude=rows)
    values, weights, loo_map = [], [], []
    for i, row in enumerate(rows):
        patches, size = kept[int(row)]
        grid = memory.loo_distances(patches, int(row), None if neighbours is None else neighbours[i]).reshape(h, w)
        loo_map.append(grid.max())
        full = grid_to_map(grid, size)
        step = max(1, int(np.ceil(np.sqrt(full.size / LOO_VALUES_PER_IMAGE))))
        sub = full[step // 2::step, step // 2::step].ravel()
        values.append(sub)
        weights.append(np.full(len(sub), full.size / len(sub)))
    model.loo_map = np.asarray(loo_map, dtype=np.float32)
    model.loo_dn2 = dn2_loo[rows]
    model.map_stats = _stats(model.loo_map)
    model.pixel_threshold = weighted_quantile(np.concatenate(values), np.concatenate(weights), PIXEL_QUANTILE)
    if image_score != "dn2":
        model.image_threshold = float(np.quantile(model.combine(model.loo_dn2, model.loo_map), 1.0 - rate))
    return model
