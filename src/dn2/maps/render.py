"""Anomaly maps for people and for programs: heat-map overlays and raw maps, written safely.

- :func:`overlay`: the map coloured (a turbo-like colour scale, no matplotlib needed) and blended over
  the original image, with the outline of the predicted mask (map > pixel threshold) in white. The
  colour scale is fixed relative to the threshold, so colours mean the same in every image: from half
  the threshold (dark blue) through the threshold (the middle, green-yellow) to 1.5 times it (dark red).
- :func:`save_map`: the overlay as ``<name>.overlay.png`` (the threshold and the colour scale in its
  text chunks) and the raw float32 map as ``<name>.map.npy`` (``np.load(path)``, no pickle), both
  through :mod:`dn2.outputs` (atomic, never over an existing file without ``force``).
- :func:`output_names`: file-system-safe, distinct names for a list of image names.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> heat = np.zeros((20, 30), np.float32); heat[5:10, 5:10] = 3.0
    >>> shown = overlay(Image.new("RGB", (30, 20), (128, 128, 128)), heat, threshold=1.0)
    >>> shown.size, shown.getpixel((0, 0)) != shown.getpixel((7, 7))
    ((30, 20), True)
    >>> output_names(["a/b.png", "a_b.png", "a/b.png"])
    ['a__b.png', 'a_b.png', 'a__b.png-2']
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from ..outputs import atomic_path, check_output_path

__all__ = ["OVERLAY_SUFFIX", "MAP_SUFFIX", "colorize", "output_names", "output_paths", "overlay", "save_map"]

OVERLAY_SUFFIX = ".overlay.png"
MAP_SUFFIX = ".map.npy"
ALPHA = 0.5  # weight of the colours over the image
BAND_PIXELS = 1 << 20  # rows coloured at a time: float temporaries stay ~16 MB for any image size

# Anton Mikhailov's polynomial fit of Google's turbo colour map (Apache-2.0), r, g, b in x in [0, 1].
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values -> uint8 RGB (..., 3) on the turbo scale from ``low`` (dark blue) to ``high`` (dark red)."""
    x = np.clip((np.asarray(values, dtype=np.float32) - low) / max(high - low, 1e-12), 0.0, 1.0)[..., None]
    powers = x ** np.arange(6, dtype=np.float32)
    rgb = powers @ _TURBO.T.astype(np.float32)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, threshold: float, alpha: float = ALPHA) -> Image.Image:
    """The map coloured relative to ``threshold`` and blended over ``image`` (same size), the outline of
    ``heat > threshold`` drawn in white (about 1/300 of the short side thick)."""
    rgb = np.asarray(image.convert("RGB"))
    heat = np.asarray(heat)
    if rgb.shape[:2] != heat.shape:
        raise ValueError(f"map of {heat.shape[0]} x {heat.shape[1]} for an image of {rgb.shape[0]} x {rgb.shape[1]}")
    out = np.empty_like(rgb)
    rows = max(1, BAND_PIXELS // max(1, heat.shape[1]))
    for top in range(0, heat.shape[0], rows):
        band = slice(top, top + rows)
        colours = colorize(heat[band], 0.5 * threshold, 1.5 * threshold).astype(np.float32)
        out[band] = (rgb[band] * (1.0 - alpha) + colours * alpha + 0.5).astype(np.uint8)
    mask = heat > threshold
    if mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        width = max(1, min(heat.shape) // 300)
        if width > 1:
            edge = ndimage.binary_dilation(edge, iterations=width - 1)
        out[edge] = 255
    return Image.fromarray(out)


def output_names(names: Sequence[str]) -> list[str]:
    """A file-system-safe stem per image name: path separators become ``__``, other unusual characters
    ``_``; a stem already taken gets ``-2``, ``-3``, ... (two images never write the same file)."""
    taken: dict[str, int] = {}
    out = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(name).replace("/", "__").replace("\\", "__")).lstrip(".") or "image"
        stem = stem[:200]
        n = taken.get(stem, 0) + 1
        taken[stem] = n
        out.append(stem if n == 1 else f"{stem}-{n}")
    return out


def output_paths(folder: str | os.PathLike, stems: Sequence[str], *, force: bool = False) -> list[tuple[Path, Path]]:
    """(overlay, map) paths of each stem in ``folder``, all checked before any work (:func:`dn2.outputs.check_output_path`)."""
    folder = Path(folder)
    return [(check_output_path(folder / f"{stem}{OVERLAY_SUFFIX}", force=force, what="map overlay"),
             check_output_path(folder / f"{stem}{MAP_SUFFIX}", force=force, what="raw map"))
            for stem in stems]


def save_map(paths: tuple[Path, Path], image: Image.Image, heat: np.ndarray, threshold: float, *,
             force: bool = False) -> None:
    """Write the overlay PNG and the raw ``.npy`` map of one image to ``paths`` (from :func:`output_paths`)."""
    overlay_path, map_path = paths
    info = PngInfo()
    info.add_text("dn2:pixel_threshold", repr(float(threshold)))
    info.add_text("dn2:colour_scale", f"turbo from {0.5 * threshold!r} to {1.5 * threshold!r}")
    shown = overlay(image, heat, threshold)
    with atomic_path(overlay_path, force=force, what="map overlay") as tmp:
        shown.save(tmp, format="PNG", pnginfo=info)
    with atomic_path(map_path, force=force, what="raw map") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(heat, dtype=np.float32), allow_pickle=False)
