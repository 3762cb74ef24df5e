"""The page's files (HTML, CSS, JavaScript), shipped inside the package: no build step, no CDN.

They are read from the package by name, from a fixed list: no name from a request ever reaches the
file system.

Example:
    >>> b"DN2Review" in asset("render.js"), media_type("dn2.css")
    (True, 'text/css; charset=utf-8')
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

__all__ = ["ASSETS", "asset", "media_type"]

#: file name -> media type of every file the page uses
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dn2.css": "text/css; charset=utf-8",
    "render.js": "text/javascript; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}


@lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """The bytes of one of :data:`ASSETS` (``KeyError`` for any other name)."""
    if name not in ASSETS:
        raise KeyError(f"no page asset {name!r}")
    return files("dn2.review").joinpath("static", name).read_bytes()


def media_type(name: str) -> str:
    """The Content-Type of asset ``name``."""
    return ASSETS[name]
