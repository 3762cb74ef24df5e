"""Anomaly maps: where an image is anomalous, from nearest normal patches (issue 13).

``dn2.DN2(maps="spade")`` (or ``"patchcore"``) also fits a map model: per location of a squashed
input image, a patch feature from the backbone's intermediate stages (:mod:`~dn2.maps.patches`); its
distance to the nearest normal patch (:mod:`~dn2.maps.memory`: SPADE among the patches of the K
training images nearest to the image by image-level DN2, or PatchCore's coreset bank of all
training patches) is the map, sampled at the original image's pixels and smoothed; a pixel threshold
is set without labels from leave-one-image-out maps of training images (:mod:`~dn2.maps.model`).
:mod:`~dn2.maps.render` saves maps (drawn by :mod:`dn2.review.overlay`); :mod:`~dn2.maps.metrics` scores maps
against ground truth (image and pixel ROCAUC, PRO).

Why SPADE by default, the features, the geometry and the thresholds: the measurements are in
``docs/research/maps.md`` and BENCHMARKS.md; the choices are documented where they are made.

Example:
    >>> import dn2
    >>> model = dn2.DN2(maps="spade").fit("normal_parts/")        # doctest: +SKIP
    >>> heat = model.anomaly_map(["part.jpg"])[0]                  # (H, W) float32 of part.jpg # doctest: +SKIP
    >>> mask = model.predict_mask(["part.jpg"])[0]                 # heat > model.pixel_threshold_ # doctest: +SKIP
"""

from .memory import METHODS, SIGMA, PatchCoreMemory, SpadeMemory, grid_to_map, make_memory, restore_memory
from .model import N_LOO_IMAGES, PIXEL_QUANTILE, Localization, MapModel, fit_maps, loo_sample
from .patches import DEFAULT_STAGES, PatchBatch, PatchNet, SquashDataset, load_patch_nets, patch_batches

__all__ = [
    "DEFAULT_STAGES", "METHODS", "N_LOO_IMAGES", "PIXEL_QUANTILE", "SIGMA", "Localization", "MapModel", "PatchBatch",
    "PatchCoreMemory", "PatchNet", "SpadeMemory", "SquashDataset", "fit_maps", "grid_to_map", "load_patch_nets",
    "loo_sample", "make_memory", "patch_batches", "restore_memory",
]
