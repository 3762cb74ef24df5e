"""Anomaly maps written to files (``dn2 score --map-dir``), safely.

- :func:`save_map`: the overlay of :func:`dn2.review.overlay.overlay` (the colour scale fixed relative to
  the pixel threshold, so colours mean the same in every image; the predicted mask outlined) as
  ``<name>.overlay.png`` (the threshold and the colour scale in its text chunks) and the raw float32 map
  as ``<name>.map.npy`` (``np.load(path)``, no pickle), both through :mod:`dn2.outputs` (atomic, never
  over an existing file without ``force``).
- :func:`output_names`: file-system-safe, distinct names for a list of image names.

Example:
    >>> output_names(["a/b.png", "a_b.png", "a/b.png", "a__b.png-2"])
    ['a__b.png', 'a_b.png', 'a__b.png-2', 'a__b.png-2-2']
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..outputs import atomic_path, check_output_path
from ..review.overlay import overlay

__all__ = ["OVERLAY_SUFFIX", "MAP_SUFFIX", "output_names", "output_paths", "save_map"]

OVERLAY_SUFFIX = ".overlay.png"
MAP_SUFFIX = ".map.npy"


def output_names(names: Sequence[str]) -> list[str]:
    """A file-system-safe stem per image name: path separators become ``__``, other unusual characters
    ``_``; a stem already taken gets ``-2``, ``-3``, ... (two images never write the same file)."""
    taken: set[str] = set()
    out = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(name).replace("/", "__").replace("\\", "__")).lstrip(".") or "image"
        stem = candidate = stem[:200]
        n = 1
        while candidate.casefold() in taken:  # "A.png" and "a.png" are one file on some file systems
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.casefold())
        out.append(candidate)
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
    info.add_text("dn2:colour_scale", f"inferno from 0 to {2 * threshold!r}")
    shown = overlay(image, heat, threshold)
    with atomic_path(overlay_path, force=force, what="map overlay") as tmp:
        shown.save(tmp, format="PNG", pnginfo=info)
    with atomic_path(map_path, force=force, what="raw map") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(heat, dtype=np.float32), allow_pickle=False)
