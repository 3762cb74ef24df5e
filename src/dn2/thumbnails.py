"""Small JPEG thumbnails of a model's memory images, kept in the model file to show *why* it judged.

"This image is close to these normal training images" explains a verdict only if one can see them,
and the training images are rarely at hand where a model is served. ``DN2(thumbnails=96)`` (``dn2 fit
--thumbnails``) keeps one JPEG per memory image (long side 96 px, about 3 KB) in the model file:
the encoded bytes packed in one uint8 tensor, an int64 ``offsets`` tensor (N + 1 entries, thumbnail
``i`` is ``data[offsets[i]:offsets[i+1]]``), and the size and format in the header. Thumbnail ``i``
belongs to memory row ``i`` (``KNNDetector.memory_names_[i]``), so a neighbour's index names its
picture. Nothing is ever decoded when a model is loaded or served: the bytes are checked (bounds,
JPEG signature) and handed out as they are.

Example:
    >>> from PIL import Image
    >>> thumbs = pack([make_thumbnail(Image.new("RGB", (200, 100), "red"), 32)], 32)
    >>> len(thumbs), thumbs[0][:3] == b"\\xff\\xd8\\xff", Image.open(io.BytesIO(thumbs[0])).size
    (1, True, (32, 16))
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import ImageSource

__all__ = ["MAX_SIZE", "MIN_SIZE", "Thumbnails", "make_thumbnail", "pack", "thumbnails_of"]

MIN_SIZE, MAX_SIZE = 16, 512  # long side in pixels: below 16 nothing is recognisable, above 512 files swell
FORMAT, MEDIA_TYPE, SIGNATURE = "JPEG", "image/jpeg", b"\xff\xd8\xff"
_QUALITY = 85  # visually clean at thumbnail size, about 3 KB at 96 px
_MAX_BYTES = 64 * MAX_SIZE * MAX_SIZE // 16  # far above any JPEG of MAX_SIZE: a bound for hostile files


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """``image`` shrunk to a long side of at most ``size`` pixels (never enlarged), as JPEG bytes."""
    small = image.convert("RGB")
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format=FORMAT, quality=_QUALITY, optimize=True)
    return out.getvalue()


@dataclass(frozen=True)
class Thumbnails:
    """The packed thumbnails of a model's memory images; ``thumbs[i]`` is the JPEG of memory row ``i``."""

    size: int
    data: np.ndarray  # uint8 (total bytes,)
    offsets: np.ndarray  # int64 (N + 1,), offsets[0] == 0, offsets[-1] == len(data)
    media_type: str = MEDIA_TYPE

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"thumbnail {i} out of range: the model has {len(self)}")
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(header entry, tensors) as stored in a model file."""
        header = {"size": self.size, "format": FORMAT, "count": len(self)}
        return header, {"thumbnails/data": self.data, "thumbnails/offsets": self.offsets}

    @classmethod
    def from_state(cls, header: Any, tensors: dict[str, np.ndarray], n_memory: int) -> "Thumbnails | None":
        """The thumbnails of a model file, or ``None`` if it has none (older files, or fitted without).

        Every field is checked, so a hostile file cannot make a reader index out of bounds or serve
        anything but JPEG bytes; raises ``ValueError`` naming the problem.
        """
        has_tensors = "thumbnails/data" in tensors or "thumbnails/offsets" in tensors
        if header is None:
            if has_tensors:
                raise ValueError("thumbnail tensors without a 'thumbnails' header entry")
            return None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"thumbnails must be {{'size', 'format': {FORMAT!r}, 'count'}}, got {header!r}")
        size, count = header.get("size"), header.get("count")
        if type(size) is not int or not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"thumbnail size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
        if count != n_memory:
            raise ValueError(f"{count!r} thumbnails for {n_memory} memory images")
        data, offsets = tensors.get("thumbnails/data"), tensors.get("thumbnails/offsets")
        if data is None or offsets is None:
            raise ValueError("thumbnail tensors 'thumbnails/data' and 'thumbnails/offsets' are missing")
        if data.dtype != np.uint8 or data.ndim != 1 or offsets.dtype != np.int64 or offsets.shape != (count + 1,):
            raise ValueError(f"thumbnail tensors must be uint8 (bytes,) and int64 ({count + 1},), "
                             f"got {data.dtype} {data.shape} and {offsets.dtype} {offsets.shape}")
        lengths = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != len(data) or (lengths < len(SIGNATURE)).any() or (lengths > _MAX_BYTES).any():
            raise ValueError("thumbnail offsets do not split the data into thumbnails")
        starts = offsets[:-1, None] + np.arange(len(SIGNATURE))
        if count and not (data[starts] == np.frombuffer(SIGNATURE, np.uint8)).all():
            raise ValueError("a thumbnail is not a JPEG")
        return cls(size, data, offsets)


def pack(images: Sequence[bytes], size: int) -> Thumbnails:
    """Encoded thumbnails -> one :class:`Thumbnails` (one byte tensor plus offsets)."""
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in images], dtype=np.int64)
    data = np.frombuffer(b"".join(images), dtype=np.uint8).copy()
    return Thumbnails(size, data, offsets)


def thumbnails_of(source: ImageSource, positions: Sequence[int], size: int) -> Thumbnails:
    """Thumbnails of the images at ``positions`` of ``source`` (e.g. the inputs of a detector's kept rows).

    The images are decoded again, JPEGs at a reduced scale (``max_side``), so this costs a fraction
    of the embedding.
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"thumbnails must be {MIN_SIZE} to {MAX_SIZE} px, got {size}")
    return pack([make_thumbnail(source.load(int(p), max_side=size), size) for p in positions], size)
