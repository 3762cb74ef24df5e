"""Turning user input (folders, paths, zip archives, PIL images, numpy arrays) into image sources.

An :class:`ImageSource` is a small picklable sequence of images (``len``, ``name(i)``, ``load(i)``)
that DataLoader workers can decode in parallel. Every decoded image is 8-bit RGB; anything that
cannot be decoded raises :class:`BadImageError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "BadImageError",
    "FileSource",
    "ImageSource",
    "PILSource",
    "ZipSource",
    "array_to_image",
    "as_source",
    "list_image_files",
    "open_image",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# EXIF orientation tag value -> the transpose that makes the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_FLOAT_TOLERANCE = 1e-4  # float arrays may stray this far outside [0, 1] through rounding


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# decoding one image


def _too_large(name: str, pixels: str) -> BadImageError:
    return BadImageError(
        f"{name}: image too large ({pixels} pixels, limit {Image.MAX_IMAGE_PIXELS:,}); refusing it as a "
        "possible decompression bomb (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    )


def _to_8bit(values: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / max_value)), 0, 255).astype(np.uint8)


def _integer_range(im: Image.Image, values: np.ndarray) -> float:
    """The maximum value of an integer image: declared bits for 16-bit files, else from the data."""
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample, e.g. 12-bit data stored in 16
    if bits:
        return float(2 ** int(bits[0] if isinstance(bits, tuple) else bits) - 1)
    if im.mode.startswith("I;16") or im.format == "PNG":
        return 65535.0
    top = float(values.max(initial=0))
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else top


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha (and transparency keys) composited on white."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im)
        if im.mode == "F":
            values = np.nan_to_num(values.astype(np.float64))
            lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
            if lo >= 0 and hi <= 1:  # floats in [0, 1]
                values = values * 255.0
            elif lo < 0 or hi > 255:  # arbitrary range: stretch min..max
                values = (values - lo) * (255.0 / max(hi - lo, 1e-12))
            gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        else:
            values = values.astype(np.int64)
            if values.min(initial=0) < 0:
                values = values - values.min()
            gray = _to_8bit(values, _integer_range(im, values))
        return Image.fromarray(gray).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, ...


def open_image(
    data: bytes | str | os.PathLike | Image.Image, name: str | None = None, max_side: int | None = None
) -> Image.Image:
    """Decode ``data`` (encoded bytes, a file path or a PIL image) to a fully loaded 8-bit RGB image.

    ``name`` labels errors (default: the path). With ``max_side``, JPEGs are decoded at a reduced
    scale that still keeps both sides >= ``max_side`` (much faster for large photos).
    """
    if not isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)):
        raise TypeError(f"open_image takes bytes, a path or a PIL image, not {type(data).__name__}")
    if isinstance(data, (str, os.PathLike)):
        name = name or str(data)
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadImageError(f"{name}: cannot read file ({error})") from error
    name = name or ("<image>" if isinstance(data, Image.Image) else "<bytes>")
    try:
        if isinstance(data, Image.Image):
            im = data
        else:
            if len(data) == 0:
                raise BadImageError(f"{name}: empty file")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
            for w in caught:
                if issubclass(w.category, Image.DecompressionBombWarning):
                    raise _too_large(name, f"{im.width} x {im.height} = {im.width * im.height:,}")
                warnings.warn(w.message, w.category, stacklevel=2)  # pass other warnings on
            if max_side and im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))
        im.load()
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # a broken EXIF block should not cost us an otherwise good image
            orientation = None
        rgb = _to_rgb(im)
        if orientation in _ORIENTATION:
            rgb = rgb.transpose(_ORIENTATION[orientation])
        return rgb
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:
        match = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(name, f"{int(match.group(1)):,}" if match else "too many") from error
    except Image.UnidentifiedImageError as error:
        raise BadImageError(f"{name}: not an image, or an unsupported image format") from error
    except Exception as error:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        raise BadImageError(f"{name}: corrupt or truncated image ({type(error).__name__}: {error})") from error


def array_to_image(a: np.ndarray, name: str) -> Image.Image:
    """One image from an (H,W), (H,W,1), (H,W,3) or (H,W,4) array: uint8 as is, uint16 / 257,
    bool as black/white, any other number type as values in [0, 1]. RGBA is composited on white."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise BadImageError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        pixels = a
    elif a.dtype == np.uint16:
        pixels = _to_8bit(a, 65535.0)
    elif a.dtype == np.bool_:
        pixels = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise BadImageError(f"{name}: array contains NaN or infinite values")
        if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            raise BadImageError(
                f"{name}: {a.dtype} values must lie in [0, 1], got min {lo:g}, max {hi:g} "
                "(pass uint8 for 0-255 data or uint16 for 16-bit data)"
            )
        pixels = _to_8bit(np.clip(a, 0, 1), 1.0)
    else:
        raise BadImageError(f"{name}: unsupported array dtype {a.dtype}")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return _to_rgb(image)


# --------------------------------------------------------------------------------------------
# finding images


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive, hidden files and folders skipped), sorted by
    relative path so that the order is the same on every machine."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    found: list[Path] = []
    seen: set[str] = set()  # real paths of visited folders, so symlink loops end
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        for f in filenames:
            if not _hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, f))
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in folder {folder}")
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _zip_members(zip_path: Path) -> list[str]:
    """Image members of a zip archive, sorted, without folders, hidden files and __MACOSX/."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"not a readable zip archive: {zip_path} ({error})") from error
    members = [
        m
        for m in names
        if not m.endswith("/")
        and not any(_hidden(part) for part in m.split("/"))
        and PurePosixPath(m).suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(members, key=lambda m: m.split("/"))


# --------------------------------------------------------------------------------------------
# image sources


class ImageSource:
    """A picklable, indexable collection of images: ``len(src)``, ``src.name(i)``, ``src.load(i)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A short label for image ``i`` (relative path, zip member, ``array[i]``...)."""
        raise NotImplementedError

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        """Image ``i`` as 8-bit RGB; ``max_side`` lets JPEGs decode at a cheaper reduced scale."""
        raise NotImplementedError

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def __getitem__(self, i: int) -> Image.Image:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        return self.load(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images)"


class FileSource(ImageSource):
    """Image files on disk; names are paths relative to ``root`` when given, else the paths."""

    def __init__(self, paths: Sequence[Path | str], root: Path | str | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        path = self.paths[i]
        if self.root is not None:
            try:
                return str(path.relative_to(self.root))
            except ValueError:
                pass
        return str(path)

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.paths[i], name=str(self.paths[i]), max_side=max_side)


class ZipSource(ImageSource):
    """Images read in place from a zip archive (never extracted); names are the member paths."""

    def __init__(self, zip_path: Path | str, members: list[str] | None = None) -> None:
        self.zip_path = Path(zip_path)
        self.members = list(members) if members is not None else _zip_members(self.zip_path)
        self._archive: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_archive"], state["_pid"] = None, None  # open file handles do not travel to workers
        return state

    def _zip(self) -> zipfile.ZipFile:
        """The archive, opened once per process (a forked child must not share the parent's handle)."""
        if self._archive is None or self._pid != os.getpid():
            self._archive = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        return self._archive

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        return self.members[i]

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of member ``i``."""
        try:
            return self._zip().read(self.members[i])
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as error:  # missing member, bad CRC...
            raise BadImageError(f"{self.zip_path}:{self.members[i]}: cannot read from archive ({error})") from error

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.read_bytes(i), name=f"{self.zip_path}:{self.members[i]}", max_side=max_side)


class PILSource(ImageSource):
    """In-memory PIL images; names are ``images[i]``."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = list(images)
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] is a {type(im).__name__}, not a PIL image")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"images[{i}]"

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.images[i], name=self.name(i))


class ArraySource(ImageSource):
    """Images in a numpy array (N,H,W) or (N,H,W,C) with C in 1, 3, 4 (or a list of (H,W[,C])
    arrays of varying sizes); names are ``array[i]``. See :func:`array_to_image` for dtypes."""

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

    def __len__(self) -> int:
        return len(self.array)

    def name(self, i: int) -> str:
        return f"array[{i}]"

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return array_to_image(self.array[i], self.name(i))


class _ConcatSource(ImageSource):
    """Several sources one after the other (several folders/zips given together)."""

    def __init__(self, parts: Sequence[ImageSource], prefixes: Sequence[str]) -> None:
        self.parts, self.prefixes = list(parts), list(prefixes)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

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


def _path_source(path: Path) -> ImageSource:
    """A folder (recursive), a zip archive, or one image file."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return FileSource(list_image_files(path), root=path)
    if path.suffix.lower() == ".zip":
        source = ZipSource(path)
        if not len(source):
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in zip archive {path}")
        return source
    return FileSource([path])


_ACCEPTED = (
    "an ImageSource, a folder, a .zip archive or image file path, a list of such paths, "
    "a PIL image or a list of them, a numpy array (N, H, W[, C]) or a list of (H, W[, C]) arrays"
)


def as_source(X: Any) -> ImageSource:
    """Turn any accepted input (see the error message of a wrong one) into an :class:`ImageSource`."""
    if isinstance(X, ImageSource):
        return X
    if isinstance(X, (str, os.PathLike)):
        return _path_source(Path(X))
    if isinstance(X, Image.Image):
        return PILSource([X])
    if isinstance(X, np.ndarray):
        if X.ndim == 3 and X.shape[2] in (3, 4) and min(X.shape[:2]) > 4:
            raise ValueError(
                f"ambiguous array shape {X.shape}: (N, H, W) would mean images {X.shape[2]} pixels wide; "
                "for one colour image pass array[None], for grayscale images a (N, H, W) array"
            )
        return ArraySource(X)
    if isinstance(X, (list, tuple)):
        if not X:
            raise ValueError("no images: the list is empty")
        if all(isinstance(x, Image.Image) for x in X):
            return PILSource(X)
        if all(isinstance(x, np.ndarray) for x in X):
            return ArraySource(list(X))
        if all(isinstance(x, (str, os.PathLike)) for x in X):
            parts = [_path_source(Path(x)) for x in X]
            if all(isinstance(s, FileSource) for s in parts):  # files and folders: one flat list of files
                return FileSource([f for s in parts for f in s.paths])  # type: ignore[attr-defined]
            prefixes = [f"{s.zip_path}:" if isinstance(s, ZipSource) else "" for s in parts]
            return _ConcatSource([FileSource(s.paths) if isinstance(s, FileSource) else s for s in parts], prefixes)
    raise TypeError(f"cannot read images from {type(X).__name__}; expected {_ACCEPTED}")
