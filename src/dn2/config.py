"""Global settings of dn2, in the manner of scikit-learn's ``set_config`` / ``config_context``.

One place for the limits that are about the machine rather than the method: how much memory the
temporaries of a computation may take (``working_memory``, as scikit-learn's setting of that name),
and how much one input file may cost before it is refused (``image_memory``, ``max_file_bytes``,
``max_compression_ratio``: see :mod:`dn2.images`).
Every setting can also be given by an environment variable (``DN2_<NAME>`` in upper case), read
when dn2 is imported; ``set_config`` and ``config_context`` override it at run time.

Example:
    >>> import dn2.config
    >>> dn2.config.get_config()["working_memory"] >= 1
    True
    >>> with dn2.config.config_context(working_memory=64):
    ...     dn2.config.get_config()["working_memory"]
    64
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator

__all__ = ["Settings", "config_context", "get_config", "image_memory_bytes", "set_config", "working_memory_bytes"]


@dataclass(frozen=True)
class Settings:
    """The settings and their defaults (each documented where it is used).

    working_memory: MiB that the temporaries of one search, distance block or coreset step may
        take, whatever the size of the data (the exact kNN, the IVF search, the benchmark
        protocols' distance blocks). Larger is not always faster: the tiles are sized for the caches.
    image_memory: MiB that decoding one image may take: its decoded pixels, their 8-bit RGB copy
        and the decoder's own working memory, all known from the file's header, which is checked
        before anything is decoded (JPEGs are first draft-reduced when a smaller size is asked
        for). An image that would need more is refused with :class:`dn2.images.BadImageError`.
        128 MiB admits e.g. a 20-megapixel 16-bit scan, a 25-megapixel 8-bit grayscale or a
        32-megapixel RGB PNG, and camera JPEGs of any size. A decoding worker holds one image at a
        time, so with the encoded file (``max_file_bytes``) it stays under 128 + 64 MiB: two
        workers add well under 500 MB to the model.
    max_file_bytes: largest image file (or zip member, once inflated) that is read, in bytes;
        checked against the size the file system or the archive declares before reading, and
        again while reading (at most this many bytes + 1 are read: files can grow, archives lie).
        64 MiB is more than any camera JPEG, or compressed PNG of an image within ``image_memory``.
    max_compression_ratio: a zip member that declares it inflates more than this many times its
        stored size is refused before it is inflated (a zip bomb; members that inflate to at most
        1 MiB are exempt). Images in zips are mostly compressed already (about 1:1); uncompressed
        BMP/TIFF/PPM of real scenes stay well below 100, while deflate can reach about 1000.
    """

    working_memory: int = 256
    image_memory: int = 128
    max_file_bytes: int = 64 * 2**20
    max_compression_ratio: int = 100

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dn2 setting {f.name} must be a positive integer, got {value!r}")


def _from_environment() -> Settings:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = os.environ.get(f"DN2_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"environment variable DN2_{f.name.upper()} must be an integer, got {raw!r}") from None
    return Settings(**values)


_settings = _from_environment()


def get_config() -> dict[str, Any]:
    """The current settings as a dict."""
    return asdict(_settings)


def set_config(**changes: Any) -> None:
    """Change settings for the rest of the process (unknown names raise ``TypeError``)."""
    global _settings
    _settings = replace(_settings, **changes)


@contextlib.contextmanager
def config_context(**changes: Any) -> Iterator[None]:
    """Change settings inside a ``with`` block only."""
    global _settings
    old = _settings
    set_config(**changes)
    try:
        yield
    finally:
        _settings = old


def working_memory_bytes() -> int:
    """``working_memory`` in bytes."""
    return _settings.working_memory * 2**20


def image_memory_bytes() -> int:
    """``image_memory`` in bytes."""
    return _settings.image_memory * 2**20
