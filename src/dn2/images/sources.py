"""Image sources: picklable sequences of images, and :func:`as_source`, which builds one from input.

An :class:`ImageSource` is ``len(src)``, ``src.name(i)`` (a printable label), ``src.load(i)`` (8-bit
RGB, or :class:`BadImageError` naming the image) and ``src.fingerprint()`` (a digest that changes
when the images or their order change; the embedding cache's key). DataLoader workers receive a
pickled copy and decode in parallel.

Which source a user input becomes is a registry, :data:`SOURCE_KINDS`, asked in order: each kind
says whether it ``accepts(X)`` (cheap, never raises) and builds itself with ``from_input(X)``.
Adding a kind is one subclass with those two class methods, plus :func:`register_source`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .archives import ZipArchive, list_zip_images
from .decode import array_to_image, open_image
from .errors import BadImageError, printable
from .files import IMAGE_EXTENSIONS, file_digest, list_image_files

__all__ = [
    "SOURCE_KINDS",
    "ArraySource",
    "ConcatSource",
    "FileSource",
    "ImageSource",
    "PILSource",
    "ZipSource",
    "as_source",
    "register_source",
]


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _existing(x: str | os.PathLike) -> Path:
    """A path the user named explicitly must exist: a typo fails at once, before any work."""
    path = Path(x)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {printable(path)}")
    return path


class ImageSource:
    """A picklable, indexable collection of images: ``len(src)``, ``src.name(i)``, ``src.load(i)``.

    Subclasses that can be built from user input also define the class methods ``accepts`` and
    ``from_input`` and are registered with :func:`register_source`.
    """

    @classmethod
    def accepts(cls, X: Any) -> bool:
        """True if :func:`as_source` should build this kind of source from ``X`` (cheap, no I/O errors)."""
        return False

    @classmethod
    def from_input(cls, X: Any) -> "ImageSource":
        """The source for an input that :meth:`accepts` took."""
        raise TypeError(f"{cls.__name__} is not built from user input")

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A short printable label for image ``i`` (relative path, zip member, ``array[i]``...)."""
        raise NotImplementedError

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        """Image ``i`` as 8-bit RGB; ``max_side`` lets JPEGs decode at a cheaper reduced scale.

        Any problem with this one image is a :class:`BadImageError` naming it.
        """
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest that changes when the images (or their order) change.

        This default hashes the decoded pixels (fine for images already in memory); sources of
        files override it with something cheaper. An image that cannot be decoded contributes
        its error message, so a bad image does not stop the hashing.
        """
        h = hashlib.sha256(type(self).__name__.encode())
        for i in range(len(self)):
            try:
                image = self.load(i)
            except BadImageError as error:
                h.update(f"bad:{error}".encode())
                continue
            h.update(str(image.size).encode())
            h.update(image.tobytes())
        return h.hexdigest()

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> Image.Image:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        return self.load(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images)"


def _stat_key(path: Path) -> list[Any]:
    """(real path, size, mtime) of a file for the fingerprint; a file that cannot be stat-ed
    (gone, dangling link) gets a placeholder instead of stopping the fingerprint."""
    try:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop in Path.resolve (Python < 3.13)
        return [printable(path), None, None]


class FileSource(ImageSource):
    """Image files on disk; names are paths relative to ``root`` when given, else the paths.

    Built from a folder (every image in it, recursively; see
    :func:`~dn2.images.files.list_image_files`) or from one image file.

    Example:
        >>> src = as_source("holiday_photos/")  # doctest: +SKIP
        >>> src.names()[:2], src.load(0).size  # doctest: +SKIP
        (['a.jpg', 'day2/b.png'], (4032, 3024))
    """

    def __init__(self, paths: Sequence[Path | str], root: Path | str | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None

    @classmethod
    def accepts(cls, X: Any) -> bool:
        return _is_path(X)

    @classmethod
    def from_input(cls, X: Any) -> "FileSource":
        path = _existing(X)
        if path.is_dir():
            return cls(list_image_files(path), root=path)
        return cls([path])

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        path = self.paths[i]
        if self.root is not None:
            try:
                return printable(path.relative_to(self.root))
            except ValueError:
                pass
        return printable(path)

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.paths[i], name=printable(self.paths[i]), max_side=max_side)

    def fingerprint(self) -> str:
        """Path, size and modification time of every file (nothing is read)."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(json.dumps([_stat_key(p) for p in self.paths]).encode())
        return h.hexdigest()


class ZipSource(ImageSource):
    """Images read in place from a zip archive (never extracted); names are the member paths.

    Members are read within the limits of :mod:`dn2.images.archives`; the archive is opened once
    per process (a forked DataLoader worker opens its own).

    Example:
        >>> src = as_source("photos.zip")  # doctest: +SKIP
        >>> src.names()[:2]  # doctest: +SKIP
        ['cats/1.jpg', 'cats/2.jpg']
    """

    def __init__(self, zip_path: Path | str, members: list[str] | None = None) -> None:
        self.zip_path = Path(zip_path)
        self.members = list(members) if members is not None else list_zip_images(self.zip_path)
        self._archive: ZipArchive | None = None
        self._pid: int | None = None

    @classmethod
    def accepts(cls, X: Any) -> bool:
        return _is_path(X) and Path(X).suffix.lower() == ".zip" and not Path(X).is_dir()

    @classmethod
    def from_input(cls, X: Any) -> "ZipSource":
        source = cls(_existing(X))
        if not len(source):
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in zip archive {printable(X)}")
        return source

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_archive"], state["_pid"] = None, None  # open file handles do not travel to workers
        return state

    def _zip(self, i: int) -> ZipArchive:
        """The archive, opened once per process (a forked child must not share the parent's handle)."""
        if self._archive is None or self._pid != os.getpid():
            try:
                self._archive = ZipArchive(self.zip_path)
            except ValueError as error:  # gone or damaged since it was listed: this image fails
                raise BadImageError(f"{printable(self.zip_path)}:{self.name(i)}: {error}") from error
            self._pid = os.getpid()
        return self._archive

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        return printable(self.members[i])

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of member ``i``, within the archive limits."""
        return self._zip(i).read(self.members[i])

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        label = f"{printable(self.zip_path)}:{self.name(i)}"
        return open_image(self.read_bytes(i), name=label, max_side=max_side)

    def fingerprint(self) -> str:
        """The archive's bytes (so a re-copied archive still matches) and the member list."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(json.dumps([file_digest(self.zip_path), self.members]).encode())
        return h.hexdigest()


class PILSource(ImageSource):
    """In-memory PIL images; names are ``images[i]``."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = list(images)
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] is a {type(im).__name__}, not a PIL image")

    @classmethod
    def accepts(cls, X: Any) -> bool:
        return isinstance(X, Image.Image) or (
            isinstance(X, (list, tuple)) and bool(X) and all(isinstance(x, Image.Image) for x in X)
        )

    @classmethod
    def from_input(cls, X: Any) -> "PILSource":
        return cls([X] if isinstance(X, Image.Image) else X)

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"images[{i}]"

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.images[i], name=self.name(i))


class ArraySource(ImageSource):
    """Images in a numpy array (N,H,W) or (N,H,W,C) with C in 1, 3, 4 (or a list of (H,W[,C])
    arrays of varying sizes); names are ``array[i]``. See :func:`~dn2.images.decode.array_to_image`
    for dtypes."""

    def __init__(self, array: np.ndarray | Sequence[np.ndarray]) -> None:
        if isinstance(array, np.ndarray):
            if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3, 4)):
                raise ValueError(f"expected an image array of shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {array.shape}")
        else:
            array = [np.asarray(a) for a in array]
            for i, a in enumerate(array):
                if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
                    raise ValueError(f"array[{i}]: expected shape (H, W) or (H, W, C) with C in 1, 3, 4; got {a.shape}")
        self.array = array

    @classmethod
    def accepts(cls, X: Any) -> bool:
        return isinstance(X, np.ndarray) or (
            isinstance(X, (list, tuple)) and bool(X) and all(isinstance(x, np.ndarray) for x in X)
        )

    @classmethod
    def from_input(cls, X: Any) -> "ArraySource":
        if isinstance(X, np.ndarray):
            if X.ndim == 3 and X.shape[2] in (3, 4) and min(X.shape[:2]) > 4:
                raise ValueError(
                    f"ambiguous array shape {X.shape}: (N, H, W) would mean images {X.shape[2]} pixels wide; "
                    "for one colour image pass array[None], for grayscale images a (N, H, W) array"
                )
            return cls(X)
        return cls(list(X))

    def __len__(self) -> int:
        return len(self.array)

    def name(self, i: int) -> str:
        return f"array[{i}]"

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return array_to_image(self.array[i], self.name(i))

    def fingerprint(self) -> str:
        """One array: its shape, dtype and bytes; a list of arrays: the decoded pixels."""
        if not isinstance(self.array, np.ndarray):
            return super().fingerprint()
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(str((self.array.shape, self.array.dtype.str)).encode())
        h.update(np.ascontiguousarray(self.array).tobytes())
        return h.hexdigest()


class ConcatSource(ImageSource):
    """Several sources one after the other (several folders/zips given together); each part's
    names get its prefix (``archive.zip:`` for the images of a zip)."""

    def __init__(self, parts: Sequence[ImageSource], prefixes: Sequence[str]) -> None:
        self.parts, self.prefixes = list(parts), list(prefixes)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    @classmethod
    def accepts(cls, X: Any) -> bool:
        return isinstance(X, (list, tuple)) and bool(X) and all(_is_path(x) for x in X)

    @classmethod
    def from_input(cls, X: Any) -> ImageSource:
        parts = [as_source(x) for x in X]
        if all(isinstance(s, FileSource) for s in parts):  # files and folders: one flat list of files
            return FileSource([f for s in parts for f in s.paths])  # type: ignore[attr-defined]
        prefixes = [f"{printable(s.zip_path)}:" if isinstance(s, ZipSource) else "" for s in parts]
        return cls([FileSource(s.paths) if isinstance(s, FileSource) else s for s in parts], prefixes)

    def _find(self, i: int) -> tuple[int, int]:
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def name(self, i: int) -> str:
        k, j = self._find(i)
        return self.prefixes[k] + self.parts[k].name(j)

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        k, j = self._find(i)
        return self.parts[k].load(j, max_side=max_side)

    def fingerprint(self) -> str:
        """The parts' fingerprints, in order (no image is decoded)."""
        h = hashlib.sha256(type(self).__name__.encode())
        h.update(json.dumps([[prefix, part.fingerprint()] for prefix, part in zip(self.prefixes, self.parts)]).encode())
        return h.hexdigest()


#: The kinds of source :func:`as_source` can build, asked in this order (the first that accepts wins).
SOURCE_KINDS: list[type[ImageSource]] = [ZipSource, FileSource, PILSource, ArraySource, ConcatSource]

_ACCEPTED = (
    "an ImageSource, a folder, a .zip archive or image file path, a list of such paths, "
    "a PIL image or a list of them, a numpy array (N, H, W[, C]) or a list of (H, W[, C]) arrays"
)


def register_source(kind: type[ImageSource]) -> type[ImageSource]:
    """Add a source kind for :func:`as_source`, asked before the built-in ones (usable as a decorator).

    Example:
        >>> @register_source
        ... class RepeatSource(ImageSource):  # doctest: +SKIP
        ...     @classmethod
        ...     def accepts(cls, X): return isinstance(X, tuple) and X[:1] == ("repeat",)
        ...     @classmethod
        ...     def from_input(cls, X): ...
    """
    if not (isinstance(kind, type) and issubclass(kind, ImageSource)):
        raise TypeError(f"a source kind is an ImageSource subclass, not {kind!r}")
    if kind not in SOURCE_KINDS:
        SOURCE_KINDS.insert(0, kind)
    return kind


def as_source(X: Any) -> ImageSource:
    """Turn any accepted input (see the error message of a wrong one) into an :class:`ImageSource`.

    Example:
        >>> src = as_source(np.zeros((2, 8, 8), np.uint8))
        >>> type(src).__name__, src.names()
        ('ArraySource', ['array[0]', 'array[1]'])
    """
    if isinstance(X, ImageSource):
        return X
    if isinstance(X, (list, tuple)) and not X:
        raise ValueError("no images: the list is empty")
    for kind in SOURCE_KINDS:
        if kind.accepts(X):
            return kind.from_input(X)
    raise TypeError(f"cannot read images from {type(X).__name__}; expected {_ACCEPTED}")
