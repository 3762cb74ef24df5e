"""The one error type for a file that cannot be used, and printable file names."""

from __future__ import annotations

import os
import re

__all__ = ["BadImageError", "printable"]


class BadImageError(ValueError):
    """One input image cannot be used; the message names the file and says why.

    Every per-file failure (missing, unreadable, special file, too large, corrupt, undecodable,
    wrong array shape) is this type, so that ``skip_bad`` can skip it and go on.
    """


# C0 and C1 control characters and DEL: they would move the cursor or recolour a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(name: str | os.PathLike | bytes) -> str:
    """``name`` as text that every console, CSV and JSON writer accepts.

    File names are bytes on Linux; Python shows undecodable bytes as lone surrogates, which
    ``print``, ``json`` (without ``ensure_ascii``) and UTF-8 files refuse. They become ``\\xNN``
    escapes here, and so do control characters (a name must not be able to rewrite a terminal).
    Used for every name that is shown or saved; the file itself is still opened by its real path.

    Example:
        >>> printable(b"caf\\xe9\\n.png")
        'caf\\\\xe9\\\\x0a.png'
        >>> printable("plain/name.png")
        'plain/name.png'
    """
    if isinstance(name, bytes):
        text = name.decode("utf-8", "backslashreplace")
    else:
        text = os.fspath(name)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "backslashreplace")
        else:
            try:  # undecodable bytes of a file name (os.fsdecode's lone surrogates) -> the bytes
                raw = text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # other lone surrogates: escape them as they are
                raw = text.encode("utf-8", "backslashreplace")
            text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
