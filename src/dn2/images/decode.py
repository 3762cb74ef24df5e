"""Decoding one image to 8-bit RGB within a memory budget, and a bounded resize-and-crop.

Memory model (why the budget is checked where it is): decoding holds the decoded pixels in the
file's own mode (Pillow stores 1 byte per pixel for 1/L/P, 2 for 16-bit, 4 for everything else,
RGB included), then, unless they are RGB already, their RGB copy (4 bytes per pixel), plus what
the decoder itself needs, known from the header too: a TIFF strip or tile (a strip may be the
whole image), WebP's RGBA canvases and their copy (12 bytes per pixel), a progressive JPEG's DCT
coefficients at full resolution (2 bytes per sample, whatever the draft scale). The conversion
to RGB runs in row bands, so its temporaries stay a few MiB whatever the image size; 16-bit,
32-bit and float images are scaled to 8 bits in float32 per band (no int64/float64 copies).
:func:`open_image` adds these up from the header, after JPEG draft reduction and before any
pixel is decoded, and refuses an image over ``dn2.config`` ``image_memory`` with
:class:`BadImageError`. Turning an image upright (EXIF orientation) needs a second copy in its
own mode; it is checked again before that copy is made. Only the first frame of a GIF, APNG,
TIFF or WebP is decoded, so the frame count costs nothing. Outside the budget, and bounded on
their own: the encoded bytes (``max_file_bytes``) and the band temporaries.

Only the formats of :data:`~dn2.images.files.IMAGE_EXTENSIONS` are decoded (Pillow can open many
more, some through external programs); anything else is "not an image, or an unsupported format".
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Callable

import numpy as np
from PIL import Image

from .. import config
from .errors import BadImageError, printable
from .files import read_file

__all__ = ["DECODED_FORMATS", "RESAMPLE", "array_to_image", "open_image", "resize_and_crop", "to_rgb"]

#: Pillow format names that are decoded: those of the image extensions (the JPEG decoder also
#: opens MPO, the multi-picture JPEG of some cameras; PPM covers PGM).
DECODED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

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
_BAND_PIXELS = 2**19  # pixels converted at a time: a few MiB of temporaries
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: Interpolation names (torchvision's) -> Pillow resampling filters.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# Resized images whose long side is at most this many times the short side are resized whole and
# then cropped, exactly as torchvision's Resize + CenterCrop; longer ones (a 1 x 50,000 strip would
# become 256 x 12.8 million) only have the part the crop keeps computed.
_WHOLE_RESIZE_ASPECT = 16


# --------------------------------------------------------------------------------------------
# the memory budget


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of Pillow's storage for ``mode``."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16") or mode in ("BGR;15", "BGR;16"):
        return 2
    return 4


def _decoder_bytes(im: Image.Image, full_size: tuple[int, int]) -> int:
    """What the decoder needs besides the decoded image, from the header (see the module docstring)."""
    w, h = im.size
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        try:
            if 322 in tags and 323 in tags:  # tiled: one tile at a time
                block = int(tags[322]) * int(tags[323])
            else:  # stripped: RowsPerStrip rows at a time (the default is every row)
                block = w * min(h, int(tags.get(278, h)))
        except (TypeError, ValueError):
            block = w * h
        return block * _pixel_bytes(im.mode)
    if im.format == "WEBP":
        return w * h * 12
    if im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        layers = getattr(im, "layer", None) or [("", 1, 1, 0)] * 3
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        samples = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
        return int(full_size[0] * full_size[1] * samples * 2)
    return 0


def _needs_conversion(im: Image.Image) -> bool:
    return not (im.mode == "RGB" and "transparency" not in im.info)


def _check_budget(name: str, size: tuple[int, int], mode: str, bytes_per_pixel: int, what: str, extra: int = 0) -> None:
    limit = config.image_memory_bytes()
    need = size[0] * size[1] * bytes_per_pixel + extra
    if need > limit:
        raise BadImageError(
            f"{name}: image too large to {what} ({size[0]} x {size[1]} {mode} needs about "
            f"{need / 2**20:,.0f} MiB; the limit is dn2.config image_memory = {limit // 2**20} MiB)"
        )


def _too_large(name: str, pixels: str) -> BadImageError:
    return BadImageError(
        f"{name}: image too large ({pixels} pixels, limit {Image.MAX_IMAGE_PIXELS:,}); refusing it as a "
        "possible decompression bomb (raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
    )


# --------------------------------------------------------------------------------------------
# conversion to 8-bit RGB, in row bands


def _scale_rows(values: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """uint8 ``rint((values - offset) * scale)`` clipped to 0..255; float32 in bands of rows."""
    out = np.empty(values.shape, dtype=np.uint8)
    row = int(np.prod(values.shape[1:], dtype=np.int64)) or 1
    step = max(1, _BAND_PIXELS // row)
    for top in range(0, len(values), step):
        band = values[top : top + step].astype(np.float32)  # one band's copy, at most _BAND_PIXELS values
        if offset:
            band -= np.float32(offset)
        band *= np.float32(scale)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        out[top : top + step] = band
    return out


def _bands(im: Image.Image) -> list[tuple[int, int, int, int]]:
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(w, 1))
    return [(0, top, w, min(h, top + rows)) for top in range(0, h, rows)]


def _value_range(im: Image.Image) -> tuple[float, float, bool]:
    """(min, max) of the finite values of an I/F/I;16 image, and whether it holds NaN."""
    lo, hi, has_nan = np.inf, -np.inf, False
    for box in _bands(im):
        values = np.asarray(im.crop(box))
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            has_nan = has_nan or bool(np.isnan(values).any())
            values = values[finite]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if lo > hi:  # nothing finite
        lo = hi = 0.0
    return lo, hi, has_nan


def _integer_range(im: Image.Image, top: float) -> float:
    """The maximum value of an integer image: declared bits for TIFF, 16 bits for 16-bit files,
    else from the data (``top``, after shifting negative data to 0)."""
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample, e.g. 12-bit data stored in 16
    if bits:
        return float(2 ** int(bits[0] if isinstance(bits, tuple) else bits) - 1)
    if im.mode.startswith("I;16") or im.format == "PNG":
        return 65535.0
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else top


def _band_converter(im: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """A function turning a band of ``im`` into 8-bit RGB (the value range is the whole image's)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        lo, hi, has_nan = _value_range(im)
        if im.mode == "F":
            if has_nan:  # NaN counts as 0, as numpy's nan_to_num would make it
                lo, hi = min(lo, 0.0), max(hi, 0.0)
            if lo >= 0 and hi <= 1:  # floats in [0, 1]
                offset, scale = 0.0, 255.0
            elif lo < 0 or hi > 255:  # arbitrary range: stretch min..max
                offset, scale = lo, 255.0 / max(hi - lo, 1e-12)
            else:
                offset, scale = 0.0, 1.0
        else:
            offset = min(lo, 0.0)  # negative data is shifted to start at 0
            scale = 255.0 / _integer_range(im, hi - offset)

        def convert(band: Image.Image) -> Image.Image:
            values = np.asarray(band)
            if values.dtype.kind == "f":
                values = np.where(np.isnan(values), np.float32(0), values)  # +-inf clip to 255 / 0
            return Image.fromarray(_scale_rows(values, offset, scale)).convert("RGB")

        return convert
    if im.mode in _ALPHA_MODES or "transparency" in im.info:

        def composite(band: Image.Image) -> Image.Image:  # alpha (or a transparency key) on white
            rgba = band.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")

        return composite
    return lambda band: band.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB (``im`` itself if it is RGB already); alpha and transparency keys are
    composited on white, 16-bit/32-bit/float values scaled to 0..255.

    Converted in row bands: besides ``im`` and the result, only a few MiB are ever allocated.

    Example:
        >>> to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    if not _needs_conversion(im):
        return im
    convert = _band_converter(im)
    bands = _bands(im)
    if len(bands) == 1:
        return convert(im)
    out = Image.new("RGB", im.size)
    for box in bands:
        out.paste(convert(im.crop(box)), box[:2])
    return out


# --------------------------------------------------------------------------------------------
# decoding


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block should not cost us an otherwise good image
        return None


def _upright(im: Image.Image, name: str, owned: bool) -> Image.Image:
    """``im`` turned upright by its EXIF orientation (a second copy, checked against the budget)."""
    orientation = _orientation(im)
    if orientation not in _ORIENTATION:
        return im
    if owned:
        _check_budget(name, im.size, im.mode, 2 * _pixel_bytes(im.mode), "turn upright")
    return im.transpose(_ORIENTATION[orientation])


def open_image(
    data: bytes | bytearray | memoryview | str | os.PathLike | Image.Image,
    name: str | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Decode ``data`` (encoded bytes, a file path or a PIL image) to a fully loaded 8-bit RGB image.

    ``name`` labels errors (default: the path). With ``max_side``, JPEGs are decoded at a reduced
    scale that still keeps both sides >= ``max_side`` (much faster for large photos). Files are
    read with :func:`~dn2.images.files.read_file` (regular files only, ``max_file_bytes``); an
    image whose decoding would need more than ``dn2.config`` ``image_memory`` is refused from its
    header. In-memory PIL images are already decoded: they are converted (never modified), not
    budgeted. Every problem with the data is a :class:`BadImageError` naming it.

    Example:
        >>> import io
        >>> buf = io.BytesIO(); Image.new("L", (3, 2), 7).save(buf, "PNG")
        >>> im = open_image(buf.getvalue(), name="gray.png")
        >>> im.mode, im.size, im.getpixel((0, 0))
        ('RGB', (3, 2), (7, 7, 7))
        >>> open_image(b"GIF89a nonsense", name="bad.gif")
        Traceback (most recent call last):
        ...
        dn2.images.errors.BadImageError: bad.gif: not an image, or an unsupported image format
    """
    if not isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)):
        raise TypeError(f"open_image takes bytes, a path or a PIL image, not {type(data).__name__}")
    if isinstance(data, (str, os.PathLike)):
        name = name or printable(data)
        data = read_file(data, name)
    name = name or ("<image>" if isinstance(data, Image.Image) else "<bytes>")
    try:
        if isinstance(data, Image.Image):
            data.load()
            rgb = to_rgb(_upright(data, name, owned=False))
            return rgb.copy() if rgb is data else rgb  # never hand back (or later modify) the caller's image
        if len(data) == 0:
            raise BadImageError(f"{name}: empty file")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                raise _too_large(name, f"{im.width} x {im.height} = {im.width * im.height:,}")
            warnings.warn(w.message, w.category, stacklevel=2)  # pass other warnings on
        full_size = im.size
        if max_side and im.format in ("JPEG", "MPO"):
            im.draft("RGB", (max_side, max_side))
        per_pixel = _pixel_bytes(im.mode) + (4 if _needs_conversion(im) else 0)
        # from the header, after the draft reduction: nothing is decoded yet
        _check_budget(name, im.size, im.mode, per_pixel, "decode", _decoder_bytes(im, full_size))
        im.load()  # the first frame only
        im = _upright(im, name, owned=True)
        return to_rgb(im)
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
    bool as black/white, any other number type as values in [0, 1]. RGBA is composited on white.

    Example:
        >>> array_to_image(np.full((2, 3), 0.5, np.float32), "array[0]").getpixel((0, 0))
        (128, 128, 128)
    """
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise BadImageError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        pixels = a
    elif a.dtype == np.uint16:
        pixels = _scale_rows(a, 0.0, 255.0 / 65535.0)
    elif a.dtype == np.bool_:
        pixels = a.astype(np.uint8)
        pixels *= 255
    elif np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise BadImageError(f"{name}: array contains NaN or infinite values")
        if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            raise BadImageError(
                f"{name}: {a.dtype} values must lie in [0, 1], got min {lo:g}, max {hi:g} "
                "(pass uint8 for 0-255 data or uint16 for 16-bit data)"
            )
        pixels = _scale_rows(a, 0.0, 255.0)  # the clip to 0..255 also absorbs the tolerance
    else:
        raise BadImageError(f"{name}: unsupported array dtype {a.dtype}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))


# --------------------------------------------------------------------------------------------
# resizing


def _crop_span(size: int, crop: int) -> tuple[int, int, int]:
    """(first, end) of the crop along one axis of the resized image, and where it lands in the
    output: torchvision's CenterCrop (rounded start; zero padding, left/top getting the floor)."""
    if size < crop:
        return 0, size, (crop - size) // 2
    start = int(round((size - crop) / 2.0))
    return start, start + crop, 0


def resize_and_crop(image: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize ``image`` so that its short side is ``resize``, then take the centre ``crop`` x ``crop``.

    The same pixels as torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image,
    without ever making the whole resized image when it would be long: an image more than 16
    times longer than wide would need a huge intermediate (a 1 x 50,000 strip: 256 x 12.8 million
    pixels), so only the part of it the crop keeps is computed (Pillow's resize with a source box;
    the box corners are single-precision floats in Pillow, so such strips may differ from the
    whole-image resize by rounding). Memory stays about ``crop`` x ``crop`` whatever the shape.

    Example:
        >>> resize_and_crop(Image.new("RGB", (1, 50_000)), 256, 224).size
        (224, 224)
    """
    resample = RESAMPLE[interpolation] if isinstance(interpolation, str) else interpolation
    w, h = image.size
    if w <= h:  # torchvision: the short side becomes `resize`, the long one is truncated
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    (x0, x1, left), (y0, y1, top) = _crop_span(new_w, crop), _crop_span(new_h, crop)
    if max(new_w, new_h) <= _WHOLE_RESIZE_ASPECT * resize:
        resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), resample)
        part = resized.crop((x0, y0, x1, y1))
    else:
        sx, sy = w / new_w, h / new_h
        part = image.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if part.size == (crop, crop):
        return part
    canvas = Image.new(image.mode, (crop, crop))  # zero padding, as CenterCrop pads
    canvas.paste(part, (left, top))
    return canvas
