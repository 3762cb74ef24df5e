"""Memories of normal patch features and the nearest-patch distance of new patches (pure numpy/torch, no I/O).

Two methods, one interface (``add`` per training image, ``finish``, ``distances``, ``loo_distances``):

- :class:`SpadeMemory` (SPADE, Cohen & Hoshen 2020, measured in ``docs/research/maps.md``):
  each training image keeps a greedy k-center coreset of ``fraction`` of its own patches; a test patch's
  distance is to the nearest kept patch of the K training images nearest to the test image by the
  image-level DN2 embedding (the caller's neighbours). Comparing a patch only with images that look like
  its own image is what made it beat PatchCore on MTD (BENCHMARKS.md, "Anomaly maps").
- :class:`PatchCoreMemory` (PatchCore, Roth et al. 2022): one bank of all training patches reduced to
  ``fraction`` by a streaming greedy k-center coreset (:class:`dn2.search.StreamingCoreset`, bounded
  memory), searched with a :mod:`dn2.search` index (``make_index``: exact or approximate).

Rows are owned by training images (``owner``: their position among the kept training images), which
gives SPADE its per-image slices and both methods their leave-one-image-out distances (each sampled
training image scored without its own patches), from which the pixel threshold is set without labels.

:func:`grid_to_map` turns a grid of distances into a map of the original image: bilinear sampling at
every pixel centre of the original (H, W) (the input was squashed, so the grid covers the whole image),
then a Gaussian of :data:`SIGMA` pixels.

Example:
    >>> rng = np.random.default_rng(0)
    >>> memory = SpadeMemory(fraction=0.5)
    >>> for image in range(3):
    ...     memory.add(image, rng.normal(size=(16, 8)).astype(np.float32))
    >>> memory.finish().patches.shape
    (24, 8)
    >>> memory.distances(memory.patches[:2], neighbours=np.array([0, 1])).tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ..search import Index, StreamingCoreset, kcenter_greedy, knn, make_index, restore_index

__all__ = ["METHODS", "SIGMA", "PatchCoreMemory", "SpadeMemory", "grid_to_map", "make_memory",
           "restore_memory"]

METHODS = ("spade", "patchcore")
#: Gaussian smoothing of maps, in pixels of the original image (PatchCore's sigma; the study's maps).
SIGMA = 4.0


def grid_to_map(grid: np.ndarray, size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """A (h, w) grid of distances sampled bilinearly at the pixel centres of an (H, W) image, then smoothed.

    Example:
        >>> m = grid_to_map(np.array([[0.0, 1.0]], np.float32), (3, 8), sigma=0)
        >>> m.shape, m.dtype, m[0].astype(float).round(2).tolist()
        ((3, 8), dtype('float32'), [0.0, 0.0, 0.12, 0.38, 0.62, 0.88, 1.0, 1.0])
    """
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return ndimage.gaussian_filter(up, sigma, mode="nearest") if sigma > 0 else up


def _n_kept(fraction: float, n: int) -> int:
    return max(1, math.ceil(fraction * n))


def _check_fraction(fraction: float) -> float:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"map_coreset must be a fraction in (0, 1], got {fraction!r}")
    return float(fraction)


class SpadeMemory:
    """Per-image coresets of patch features; distances to the patches of chosen training images.

    ``fraction`` of each image's patches are kept (greedy k-center within the image, on a 128-d
    random projection). Rows are stored image after image, so image ``j`` owns one contiguous slice.
    """

    method = "spade"

    def __init__(self, fraction: float):
        self.fraction = _check_fraction(fraction)
        self._parts: list[np.ndarray] = []
        self._owners: list[int] = []

    def add(self, image: int, patches: np.ndarray) -> None:
        """Keep a coreset of one training image's patches (n, D); images are added in increasing order."""
        if self._owners and image <= self._owners[-1]:
            raise ValueError(f"images must be added in increasing order, got {image} after {self._owners[-1]}")
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if self.fraction < 1.0:
            patches = patches[np.sort(kcenter_greedy(patches, _n_kept(self.fraction, len(patches))))]
        self._parts.append(patches)
        self._owners.append(image)

    def finish(self) -> "SpadeMemory":
        """Stack the kept patches into ``patches`` (M, D) and ``owner`` (M,) int32."""
        if not self._parts:
            raise ValueError("no training image has patches")
        self.patches = np.concatenate(self._parts)
        self.owner = np.repeat(np.asarray(self._owners, dtype=np.int32), [len(p) for p in self._parts])
        self._parts = []
        self._set_slices()
        return self

    def _set_slices(self) -> None:
        images, starts = np.unique(self.owner, return_index=True)
        self.images = images
        self.starts = np.append(starts, len(self.owner)).astype(np.int64)

    def has_patches(self, n_images: int) -> np.ndarray:
        """Which of the first ``n_images`` training images own rows (an image that could not be read has none)."""
        out = np.zeros(n_images, dtype=bool)
        out[self.images[self.images < n_images]] = True
        return out

    def _rows(self, neighbours: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.images, neighbours)
        if (pos >= len(self.images)).any() or (self.images[np.minimum(pos, len(self.images) - 1)] != neighbours).any():
            raise ValueError("a neighbour owns no patches")
        return np.concatenate([self.patches[self.starts[p]:self.starts[p + 1]] for p in pos])

    def distances(self, patches: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """Distance of each patch (n, D) to the nearest kept patch of the training images ``neighbours`` (K,)."""
        return knn(self._rows(np.asarray(neighbours).reshape(-1)), patches, 1)[0][:, 0]

    def loo_distances(self, patches: np.ndarray, image: int, neighbours: np.ndarray) -> np.ndarray:
        """:meth:`distances` of a training image's own patches; ``neighbours`` must leave the image out."""
        if image in np.asarray(neighbours):
            raise ValueError("leave-one-out neighbours must not include the image itself")
        return self.distances(patches, neighbours)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild the memory."""
        return {"patches": self.patches, "owner": self.owner}

    def header(self) -> dict[str, Any]:
        return {"method": self.method, "fraction": self.fraction}


class PatchCoreMemory:
    """One bank of training patches, reduced to ``fraction`` by a streaming greedy k-center coreset.

    Working memory while adding: one coreset step (see :class:`dn2.search.StreamingCoreset`) and the
    per-image row counts, whatever the number of images. The bank is searched by ``make_index(index,
    **index_params)``.
    """

    method = "patchcore"

    def __init__(self, fraction: float, index: str = "exact",
                 index_params: Mapping[str, Any] | None = None):
        self.fraction = _check_fraction(fraction)
        self.index_kind = index
        self.index_params = dict(index_params or {})
        make_index(index, **self.index_params)  # checks the kind and its parameters now
        self._stream = StreamingCoreset(self.fraction)
        self._images: list[int] = []
        self._counts: list[int] = []

    def add(self, image: int, patches: np.ndarray) -> None:
        """Stream one training image's patches (n, D) into the coreset."""
        self._stream.add(np.ascontiguousarray(patches, dtype=np.float32))
        self._images.append(image)
        self._counts.append(len(patches))

    def finish(self) -> "PatchCoreMemory":
        """Finish the coreset (``patches``, ``owner``) and index it."""
        if not self._images:
            raise ValueError("no training image has patches")
        self.patches, positions = self._stream.finish()
        ends = np.cumsum(self._counts)
        self.owner = np.asarray(self._images, dtype=np.int32)[np.searchsorted(ends, positions, side="right")]
        self._images, self._counts = [], []
        self.index: Index = make_index(self.index_kind, **self.index_params).fit(self.patches)
        return self

    def has_patches(self, n_images: int) -> np.ndarray:
        out = np.zeros(n_images, dtype=bool)
        owners = np.unique(self.owner)
        out[owners[owners < n_images]] = True
        return out

    def distances(self, patches: np.ndarray, neighbours: np.ndarray | None = None) -> np.ndarray:
        """Distance of each patch (n, D) to the nearest bank patch (``neighbours`` is not used)."""
        return self.index.search(np.ascontiguousarray(patches, dtype=np.float32), 1)[0][:, 0]

    def loo_distances(self, patches: np.ndarray, image: int, neighbours: np.ndarray | None = None) -> np.ndarray:
        """Distance of a training image's patches to the nearest bank patch owned by another image."""
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        out = np.empty(len(patches), dtype=np.float32)
        todo = np.arange(len(patches))
        k = 16
        while len(todo):
            k = min(k, self.index.ntotal)
            dist, idx = self.index.search(patches[todo], k)
            other = (self.owner[np.maximum(idx, 0)] != image) & (idx >= 0)
            found = other.any(axis=1)
            out[todo[found]] = dist[found, other[found].argmax(axis=1)]
            todo = todo[~found]
            if len(todo) and k == self.index.ntotal:
                raise ValueError("leave-one-out: no bank patch belongs to another training image")
            k *= 4
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"patches": self.patches, "owner": self.owner,
                **{f"index/{key}": value for key, value in self.index.state().items()}}

    def header(self) -> dict[str, Any]:
        return {"method": self.method, "fraction": self.fraction, "index": self.index_kind,
                "index_params": self.index_params}


def make_memory(method: str, fraction: float, index: str = "exact",
                index_params: Mapping[str, Any] | None = None) -> SpadeMemory | PatchCoreMemory:
    """An empty memory of ``method`` ("spade" or "patchcore") keeping ``fraction`` of the patches."""
    if method not in METHODS:
        raise ValueError(f"maps must be one of {METHODS}, got {method!r}")
    if method == "spade":
        return SpadeMemory(fraction)
    return PatchCoreMemory(fraction, index, index_params)


def restore_memory(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray], dim: int,
                   n_images: int) -> SpadeMemory | PatchCoreMemory:
    """Rebuild a finished memory from :meth:`header` and :meth:`state` (as read from a model file), checking
    every array: ``patches`` (M, ``dim``) finite float32, ``owner`` (M,) int32 in [0, ``n_images``)."""
    if not isinstance(header, Mapping):
        raise ValueError("maps memory header must be a mapping")
    method = header.get("method")
    if method not in METHODS:
        raise ValueError(f"maps method must be one of {METHODS}, got {method!r}")
    patches, owner = tensors.get("patches"), tensors.get("owner")
    if not isinstance(patches, np.ndarray) or patches.dtype != np.float32 or patches.ndim != 2 or patches.shape[1] != dim \
            or len(patches) == 0:
        raise ValueError(f"tensor 'maps/patches' must be a non-empty (M, {dim}) float32 array")
    if not np.isfinite(patches).all():
        raise ValueError("tensor 'maps/patches' holds NaN or infinite values")
    if not isinstance(owner, np.ndarray) or owner.dtype != np.int32 or owner.shape != (len(patches),) \
            or owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"tensor 'maps/owner' must be ({len(patches)},) int32 in [0, {n_images})")
    if method == "spade":
        if (np.diff(owner) < 0).any():
            raise ValueError("tensor 'maps/owner' of a SPADE memory must be sorted")
        memory: SpadeMemory | PatchCoreMemory = SpadeMemory(header.get("fraction"))
        memory.patches, memory.owner = patches, owner
        memory._set_slices()
        return memory
    index_params = header.get("index_params")
    if not isinstance(index_params, dict):
        raise ValueError("maps index_params must be a mapping")
    memory = PatchCoreMemory(header.get("fraction"), header.get("index"), index_params)
    memory.patches, memory.owner = patches, owner
    state = {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith("index/")}
    memory.index = restore_index(memory.index_kind, patches, memory.index_params, state)
    return memory
