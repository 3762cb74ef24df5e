"""Writing outputs safely: checked before any work, written atomically, never overwritten silently.

Every file dn2 writes (model files, CSV scores, maps, reports) goes through here: the path is checked
up front (:func:`check_output_path`: its folder exists and is writable, it is not a folder, it does
not exist unless ``force``, its name fits the file system), so a mistake is reported before a long
run rather than after it; the data is written to a temporary file beside it and renamed over it in
one step (:func:`atomic_path`), so a crash or a full disk never leaves a half-written file or
destroys the old one.

Example:
    >>> import tempfile, pathlib
    >>> from dn2.outputs import atomic_path
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "scores.csv"
    >>> with atomic_path(out) as tmp:
    ...     _ = tmp.write_text("image,score\\n")
    >>> out.read_text()
    'image,score\\n'
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["OutputPathError", "atomic_path", "check_output_path"]

_TMP_SUFFIX_LEN = 24  # ".dn2-" + 12 hex digits + ".tmp" and room to spare


class OutputPathError(OSError):
    """An output path that cannot be written; the message names it and says why."""


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # not POSIX, or the file system does not say
        return 255


def check_output_path(path: str | os.PathLike, *, force: bool = False, what: str = "output file") -> Path:
    """The path as a ``Path`` if a file can be written there; ``FileExistsError`` if it exists and not
    ``force``; ``OutputPathError`` (an ``OSError``) naming the path otherwise."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"{path}: not a file name ({what})")
    if not parent.exists():
        raise OutputPathError(f"{path}: folder {parent} does not exist ({what})")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: {parent} is not a folder ({what})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: no permission to write in {parent} ({what})")
    if len(os.fsencode(path.name)) > _name_max(parent):
        raise OutputPathError(f"{path}: file name too long for the file system ({what})")
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder, not a file ({what})")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path}: file exists; use --force (force=True) to overwrite it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False, what: str = "output file") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` in one step.

    The temporary name is short (the target's name may be at the file system's limit) and created
    exclusively; it is removed if the block fails. The existence check is repeated just before the
    rename, so a file that appeared meanwhile is not overwritten without ``force``.
    """
    path = check_output_path(path, force=force, what=what)
    tmp = path.with_name(f".dn2-{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours umask
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        if not force and (path.exists() or path.is_symlink()):
            raise FileExistsError(f"{path}: file exists; use --force (force=True) to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
