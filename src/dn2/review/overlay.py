"""Heat-map overlays: an anomaly map drawn over its image, for people to see *where* a model looks.

The one drawing of a map in dn2: the page and the report (:func:`heatmap_overlay`), the files of
``dn2 score --map-dir`` and the figures of ``dn2 bench localize`` (:func:`overlay`).

The map is normalised against the pixel threshold (the threshold sits in the middle of the colour
scale, so the same colour means the same thing on every image of a model), coloured with a
perceptually ordered map (dark purple -> orange -> pale yellow, as matplotlib's "inferno": readable
by colour-blind people and in grey), blended over the image more strongly where the map is higher
(normal regions stay visible underneath), and the threshold contour is drawn in white with a dark
edge so it shows on any background. Without a threshold the map is stretched between its own
minimum and maximum and no contour is drawn.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> amap = np.zeros((40, 60), np.float32); amap[10:20, 20:40] = 2.0
    >>> png = heatmap_overlay(Image.new("RGB", (60, 40), "grey"), amap, threshold=1.0)
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", Image.open(io.BytesIO(png)).size
    (True, (60, 40))
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["COLOURS", "colour_map", "heatmap_overlay", "overlay"]

#: Anchor colours of the map, low to high (sampled from "inferno"); interpolated to 256 entries.
COLOURS = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
           (250, 193, 39), (252, 255, 164))
_MAX_SIDE = 512  # overlays are for looking at: larger images are shrunk first (small responses and reports)
_ALPHA_LOW, _ALPHA_HIGH = 0.15, 0.7  # blend weight of the colour at the bottom and top of the scale
_BAND_PIXELS = 1 << 20  # pixels coloured at a time: float temporaries of ~16 MB for any image size


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB of the same shape + (3,)."""
    anchors = np.asarray(COLOURS, dtype=np.float32)
    steps = np.linspace(0.0, 1.0, len(anchors))
    table = np.stack([np.interp(np.linspace(0, 1, 256), steps, anchors[:, c]) for c in range(3)], axis=1)
    return table.round().astype(np.uint8)[np.clip(values * 255, 0, 255).astype(np.uint8)]


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it, widened by one pixel (a visible contour)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inner
    wide = np.pad(edge, 1)
    return edge | wide[:-2, 1:-1] | wide[2:, 1:-1] | wide[1:-1, :-2] | wide[1:-1, 2:]


def _levels(amap: np.ndarray, threshold: float | None, stretch: tuple[float, float]) -> np.ndarray:
    """Map values -> [0, 1]: the threshold at mid-scale, or without one the map's own range."""
    if threshold is not None and threshold > 0:
        level = amap / np.float32(2 * threshold)
    else:
        lo, hi = stretch
        level = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    return np.clip(level, 0.0, 1.0)


def overlay(image: Image.Image, amap: np.ndarray, threshold: float | None) -> Image.Image:
    """The anomaly map ``amap`` drawn over ``image`` at the image's own size (an RGB image), with the
    ``threshold`` contour. ``amap`` must have the image's (H, W); NaN counts as 0. Colours are made a band
    of rows at a time, so the float temporaries stay small whatever the image's size."""
    rgb = np.asarray(image.convert("RGB"))
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"an anomaly map must be a non-empty 2-D array, got shape {amap.shape}")
    if amap.shape != rgb.shape[:2]:
        raise ValueError(f"map of {amap.shape[0]} x {amap.shape[1]} for an image of {rgb.shape[0]} x {rgb.shape[1]}")
    amap = np.nan_to_num(amap, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0)
    stretch = (float(amap.min()), float(amap.max()))
    out = np.empty_like(rgb)
    rows = max(1, _BAND_PIXELS // amap.shape[1])
    for top in range(0, amap.shape[0], rows):
        band = slice(top, top + rows)
        level = _levels(amap[band], threshold, stretch)
        alpha = (_ALPHA_LOW + (_ALPHA_HIGH - _ALPHA_LOW) * level)[..., None]
        out[band] = (rgb[band] * (1 - alpha) + colour_map(level).astype(np.float32) * alpha).round().astype(np.uint8)
    if threshold is not None:
        mask = amap > threshold
        ring = _edges(mask)
        out[ring & ~mask] = (20, 20, 20)  # dark outside, white inside: visible on light and dark images
        out[ring & mask] = (255, 255, 255)
    return Image.fromarray(out)


def heatmap_overlay(image: Image.Image, amap: np.ndarray, threshold: float | None) -> bytes:
    """:func:`overlay` as PNG bytes for a page: images larger than 512 px are shrunk first, and ``amap``
    may have another size than the image (it is resized to it)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"an anomaly map must be a non-empty 2-D array, got shape {amap.shape}")
    rgb = image.convert("RGB")
    rgb.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.BILINEAR)
    amap = np.nan_to_num(amap, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0)
    if amap.shape != (rgb.height, rgb.width):
        amap = np.asarray(Image.fromarray(amap).resize(rgb.size, Image.Resampling.BILINEAR))
    buffer = io.BytesIO()
    overlay(rgb, amap, threshold).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
