"""Finding image files and reading them safely: regular files only, never more than a set size.

Policy (hostile input must not take the machine down, and one bad file must not stop a run):

- Only regular files are read. FIFOs, sockets, devices and folders that are named like images
  are refused by their type, without blocking: the path is ``stat``-ed before it is opened (a
  device is never even opened), then opened with ``O_NONBLOCK`` and checked again with ``fstat``
  (the file that was opened is the one checked, whatever was swapped in between).
- Symbolic links are followed, to files and to folders, also when they lead out of the input
  folder: datasets are often symlinked from shared storage, and dn2 only reads images, so a link
  grants nothing the user running dn2 could not read anyway. A link is used only if it ends at a
  regular file (or, when listing, at a folder); dangling links and link loops fail as bad files.
  When listing, a linked folder that is the folder being walked or one of its ancestors (a link
  to ``/`` or ``..``) is not entered, and no folder is walked twice.
- Sizes are bounded: a file larger than ``dn2.config`` ``max_file_bytes`` is refused from its
  ``fstat`` size before reading, and reading stops after that many bytes + 1 (a file can grow).
- Listing never stops at an odd entry: unreadable sub-folders are skipped with one warning,
  names that are not valid UTF-8 are kept (shown with :func:`~dn2.images.errors.printable`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from .. import config
from .errors import BadImageError, printable

__all__ = [
    "IMAGE_EXTENSIONS",
    "file_digest",
    "is_hidden",
    "is_image_name",
    "list_image_files",
    "open_regular",
    "read_file",
    "read_limited",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
# O_NOCTTY: opening a terminal device never makes it our controlling terminal.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_CHUNK = 2**20  # read size once the expected size has been read


def is_hidden(part: str) -> bool:
    """True for a hidden path component (``.git``, ``.DS_Store``) or macOS zip debris (``__MACOSX``).

    The one rule for folders and zip archives alike: anything under a hidden component is skipped.
    """
    return part.startswith(".") or part == "__MACOSX"


def is_image_name(name: str) -> bool:
    """True if the last component of ``name`` has an image extension and is not hidden."""
    base = os.path.basename(name)
    return not is_hidden(base) and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def _require_regular(st: os.stat_result, label: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(f"{label}: not a regular file ({_file_kind(st.st_mode)}); only regular files are read")


def _not_found(path: str | os.PathLike, label: str) -> BadImageError:
    if os.path.islink(path):
        return BadImageError(f"{label}: broken symbolic link (its target does not exist)")
    return BadImageError(f"{label}: file not found")


def open_regular(path: str | os.PathLike, name: str | None = None) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` for reading if it is (or links to) a regular file; returns (file, its fstat).

    Never blocks (a FIFO is refused, not waited on) and never opens a device. Every failure is a
    :class:`BadImageError` naming the file (``name``, default the path) and the reason.

    Example:
        >>> open_regular("/dev/null", "null.png")
        Traceback (most recent call last):
        ...
        dn2.images.errors.BadImageError: null.png: not a regular file (a character device); only regular files are read
    """
    label = name or printable(path)
    try:
        _require_regular(os.stat(path), label)  # refuse special files before opening them at all
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise _not_found(path, label) from None
    except BadImageError:
        raise
    except OSError as error:  # permission denied, a link loop, a name too long...
        raise BadImageError(f"{label}: cannot read file ({_reason(error)})") from error
    try:
        st = os.fstat(fd)  # what was opened, not what the path pointed to a moment ago
        _require_regular(st, label)
        return os.fdopen(fd, "rb", buffering=0), st
    except BaseException:
        os.close(fd)
        raise


def read_limited(stream: BinaryIO, limit: int, name: str, expected: int | None = None) -> bytes:
    """All bytes of ``stream`` if there are at most ``limit``, else :class:`BadImageError`.

    At most ``limit + 1`` bytes are ever read. ``expected`` (the declared size) is read in one
    call, so the usual case costs one buffer and no joining.
    """
    chunks: list[bytes] = []
    total = 0
    want = min(expected, limit) + 1 if expected is not None else _CHUNK
    while total <= limit:
        block = stream.read(min(want, limit + 1 - total))
        if not block:
            break
        chunks.append(block)
        total += len(block)
        want = _CHUNK
    if total > limit:
        raise BadImageError(f"{name}: too large (more than {limit:,} bytes; the limit is dn2.config max_file_bytes)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_file(path: str | os.PathLike, name: str | None = None, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (default ``dn2.config`` ``max_file_bytes``).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".png") as f:
        ...     _ = f.write(b"12345"); f.flush()
        ...     read_file(f.name)
        b'12345'
    """
    label = name or printable(path)
    limit = config.get_config()["max_file_bytes"] if limit is None else limit
    stream, st = open_regular(path, label)
    with stream:
        if st.st_size > limit:
            raise BadImageError(f"{label}: too large ({st.st_size:,} bytes; the limit is dn2.config max_file_bytes = {limit:,})")
        try:
            return read_limited(stream, limit, label, expected=st.st_size)
        except OSError as error:  # an I/O error in the middle of the file
            raise BadImageError(f"{label}: cannot read file ({_reason(error)})") from error


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes, computed once per (path, size, mtime) in a process."""
    stream, st = open_regular(path)
    stream.close()
    return _digest_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int, chunk: int = 2**20) -> str:
    """sha256 of the file's bytes (streamed); size and mtime only key the memo."""
    digest = hashlib.sha256()
    stream, _ = open_regular(path)
    with stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_ancestor_or_self(candidate: str, path: str) -> bool:
    return path == candidate or path.startswith(candidate.rstrip(os.sep) + os.sep)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, hidden files and folders skipped), sorted by
    relative path so that the order is the same on every machine.

    Entries are listed by name only: a dangling link, a FIFO or a folder named ``x.png`` is
    found here and refused when it is read (:class:`BadImageError`, one file). Sub-folders that
    cannot be listed are skipped with one warning; links are followed as the module says.

    Example:
        >>> list_image_files("holiday_photos/")  # doctest: +SKIP
        [PosixPath('holiday_photos/a.jpg'), PosixPath('holiday_photos/day2/b.png')]
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {printable(folder)}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {printable(folder)}")
    found: list[Path] = []
    unlisted: list[OSError] = []
    seen: set[str] = set()  # real paths of visited folders: none is walked twice
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unlisted.append):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        kept = []
        for d in dirnames:
            if is_hidden(d):
                continue
            target = os.path.realpath(os.path.join(dirpath, d))
            if target in seen or _is_ancestor_or_self(target, real):  # a link back up the tree
                continue
            kept.append(d)
        dirnames[:] = sorted(kept)  # sorted: which of two links to one folder is walked is the same everywhere
        found.extend(Path(dirpath, f) for f in filenames if is_image_name(f))
    root_error = next((e for e in unlisted if e.filename is not None and Path(e.filename) == folder), None)
    if root_error is not None:
        raise ValueError(f"cannot list folder {printable(folder)}: {_reason(root_error)}")
    if unlisted:
        first = unlisted[0]
        warnings.warn(
            f"skipped {len(unlisted)} folder(s) of {printable(folder)} that could not be listed, "
            f"e.g. {printable(first.filename or '?')} ({_reason(first)})",
            stacklevel=2,
        )
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder {printable(folder)}")
    return sorted(found, key=lambda p: p.relative_to(folder).parts)
