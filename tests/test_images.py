"""dn2.images: decoding every kind of image to RGB, clear errors, and the image sources."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2.images import (
    IMAGE_EXTENSIONS,
    ArraySource,
    BadImageError,
    FileSource,
    ImageSource,
    PILSource,
    ZipSource,
    array_to_image,
    as_source,
    list_image_files,
    open_image,
)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(w: int = 32, h: int = 24) -> Image.Image:
    """An RGB image whose pixel (x, y) is (8x, 8y, 100): easy to check after flips and rotations."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 8, y * 8, np.full_like(x, 100)], -1).astype(np.uint8))


def px(im: Image.Image, xy=(0, 0)) -> tuple:
    assert im.mode == "RGB"
    return im.getpixel(xy)


# ----------------------------------------------------------------------------- conversions


def test_grayscale_and_bilevel_become_rgb():
    assert px(open_image(encode(Image.new("L", (4, 4), 77), "PNG"))) == (77, 77, 77)
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 0), 1)
    im = open_image(encode(bilevel, "PNG"))
    assert px(im, (0, 0)) == (0, 0, 0) and px(im, (1, 0)) == (255, 255, 255)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (200, 0, 0, 0))  # fully transparent -> white
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    im = open_image(encode(rgba, "PNG"))
    assert px(im, (0, 0)) == (200, 0, 0)
    assert px(im, (1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in px(im, (2, 0)))
    la = Image.new("LA", (2, 2), (10, 0))
    assert px(open_image(encode(la, "PNG"))) == (255, 255, 255)


def test_palette_with_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    im = open_image(encode(pal, "PNG", transparency=0))
    assert px(im, (0, 0)) == (255, 255, 255)  # transparent index -> white
    assert px(im, (1, 0)) == (0, 0, 255)
    gif = open_image(encode(pal, "GIF", transparency=0))
    assert px(gif, (0, 0)) == (255, 255, 255) and px(gif, (1, 0)) == (0, 0, 255)


def test_16bit_png_is_scaled_by_257():
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    im = open_image(encode(Image.fromarray(values), "PNG"))
    assert [px(im, (x, 0))[0] for x in range(4)] == [0, 100, 255, 4]  # 1000 / 257 = 3.9


def test_float_tiff_in_unit_range():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    im = open_image(encode(Image.fromarray(values), "TIFF"))
    assert [px(im, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    r, g, b = px(open_image(encode(cmyk, "JPEG", quality=95)))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied():
    original = gradient(32, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im = open_image(encode(original, "PNG", exif=exif))
    assert im.size == (24, 32)
    assert np.array_equal(np.asarray(im), np.asarray(original.transpose(Image.Transpose.ROTATE_270)))


def test_pil_image_input_is_converted_and_not_modified():
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = open_image(src)
    assert px(out) == (255, 255, 255) and src.mode == "RGBA" and out is not src


def test_large_jpeg_draft_keeps_at_least_max_side():
    photo = gradient(32, 24).resize((1600, 1200))
    data = encode(photo, "JPEG")
    assert open_image(data).size == (1600, 1200)
    small = open_image(data, max_side=300)
    assert small.size == (400, 300)  # 1/4 scale: the largest reduction that keeps both sides >= 300
    assert open_image(encode(photo, "PNG"), max_side=300).size == (1600, 1200)  # only JPEG has draft


def test_normal_large_image_still_opens():
    big = Image.new("L", (6000, 4000), 30)
    assert open_image(encode(big, "PNG")).size == (6000, 4000)


# ----------------------------------------------------------------------------- errors


def test_corrupt_and_non_image_data_name_the_file(tmp_path):
    with pytest.raises(BadImageError, match=r"scan\.png: not an image"):
        open_image(b"\x00\x01 definitely not an image", name="scan.png")
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file")
    with pytest.raises(BadImageError, match="notes.jpg"):
        open_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png: empty file"):
        open_image(empty)
    with pytest.raises(BadImageError, match="missing.png: file not found"):  # one error type per file
        open_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="bytes, a path or a PIL image"):
        open_image(123)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail_at_open(tmp_path, fmt):
    data = encode(gradient(64, 64).resize((256, 256)), fmt)
    cut = tmp_path / f"half.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=rf"half\.{fmt.lower()}: corrupt or truncated"):
        open_image(cut)


def test_decompression_bomb_is_refused(monkeypatch):
    data = encode(Image.new("L", (100, 50), 0), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 5,000 pixels: warning zone (> limit)
    with pytest.raises(BadImageError, match=r"bomb\.png: image too large \(100 x 50 = 5,000 pixels"):
        open_image(data, name="bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x the limit: Pillow raises itself
    with pytest.raises(BadImageError, match=r"bomb\.png: image too large \(5,000 pixels, limit 1,000\)"):
        open_image(data, name="bomb.png")


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((4, 5), 9, np.uint8), (9, 9, 9)),
        (np.full((4, 5, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((4, 5, 3), [1, 2, 3], np.uint8), (1, 2, 3)),
        (np.full((4, 5, 4), [1, 2, 3, 0], np.uint8), (255, 255, 255)),
        (np.full((4, 5, 4), [1, 2, 3, 255], np.uint8), (1, 2, 3)),
        (np.full((4, 5), 257 * 7, np.uint16), (7, 7, 7)),
        (np.full((4, 5, 3), [0.0, 0.5, 1.0], np.float32), (0, 128, 255)),
        (np.full((4, 5), 1.00001, np.float64), (255, 255, 255)),  # rounding noise is tolerated
        (np.ones((4, 5), bool), (255, 255, 255)),
        (np.ones((4, 5), np.int64), (255, 255, 255)),  # other numbers: [0, 1] like floats
    ],
)
def test_array_to_image_accepts(array, expected):
    im = array_to_image(array, "array[0]")
    assert im.size == (5, 4) and px(im, (4, 3)) == expected


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 5, 2), np.uint8), r"got shape \(4, 5, 2\)"),
        (np.zeros((2, 4, 5, 3), np.uint8), r"got shape \(2, 4, 5, 3\)"),
        (np.zeros(5, np.uint8), r"got shape \(5,\)"),
        (np.full((4, 5), 2.0), "values must lie in \\[0, 1\\], got min 2, max 2"),
        (np.full((4, 5), 255, np.int32), "max 255"),
        (np.full((4, 5), np.nan), "NaN"),
    ],
)
def test_array_to_image_rejects(array, message):
    with pytest.raises(BadImageError, match=r"^array\[3\]: .*" + message):
        array_to_image(array, "array[3]")


def test_array_source_shapes():
    gray = ArraySource(np.zeros((3, 8, 6), np.uint8))
    assert len(gray) == 3 and gray.names() == ["array[0]", "array[1]", "array[2]"]
    assert gray.load(2).size == (6, 8)
    colour = ArraySource(np.full((2, 8, 6, 3), 0.25, np.float32))
    assert px(colour.load(1)) == (64, 64, 64)
    for bad in [(3, 8), (2, 8, 6, 2), (1, 2, 3, 4, 5)]:
        with pytest.raises(ValueError, match=rf"got \({', '.join(map(str, bad))},?\)"):
            ArraySource(np.zeros(bad, np.uint8))
    with pytest.raises(BadImageError, match=r"array\[0\]: float64 values must lie in \[0, 1\]"):
        ArraySource(np.full((1, 2, 2), 3.0)).load(0)


# ----------------------------------------------------------------------------- folders and files


def test_list_image_files_recursive_sorted_and_skipping_hidden(tmp_path):
    for rel in ["b.png", "a/z.JPG", "a/b/c.tif", "A2.webp", "sub/x.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        gradient(4, 4).save(tmp_path / rel, format="PNG")  # content type does not matter here
    for rel in [".hidden.png", ".git/obj.png", "sub/.cache/t.png", "notes.txt", "sub/data.csv", "__MACOSX/a.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert rel == ["A2.webp", "a/b/c.tif", "a/z.JPG", "b.png", "sub/x.jpeg"]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_image_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* found in folder .*empty"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty"):
        as_source(tmp_path / "empty")


def test_folder_source_names_are_relative(tmp_path):
    (tmp_path / "good").mkdir()
    Image.new("L", (3, 3), 50).save(tmp_path / "good" / "1.png")
    Image.new("RGB", (3, 3), (1, 2, 3)).save(tmp_path / "0.bmp")
    src = as_source(tmp_path)
    assert isinstance(src, FileSource)
    assert [Path(n).as_posix() for n in src.names()] == ["0.bmp", "good/1.png"]
    assert px(src.load(0)) == (1, 2, 3) and px(src.load(1)) == (50, 50, 50)
    assert px(src[-1]) == (50, 50, 50)
    one = as_source(str(tmp_path / "0.bmp"))
    assert len(one) == 1 and one.name(0) == str(tmp_path / "0.bmp")


def test_bad_file_in_source_names_the_path(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        as_source(tmp_path).load(0)


def test_list_of_paths(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (2, 2), 1).save(a)
    Image.new("L", (2, 2), 2).save(b)
    src = as_source([b, str(a)])
    assert src.names() == [str(b), str(a)]  # order as given
    assert px(src.load(0)) == (2, 2, 2)
    with pytest.raises(FileNotFoundError, match="c.png"):
        as_source([a, tmp_path / "c.png"])


def test_list_mixing_folders_and_zips(tmp_path):
    (tmp_path / "dir").mkdir()
    Image.new("L", (2, 2), 1).save(tmp_path / "dir" / "a.png")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.writestr("z.png", encode(Image.new("L", (2, 2), 9), "PNG"))
    src = pickle.loads(pickle.dumps(as_source([tmp_path / "dir", tmp_path / "more.zip"])))
    assert src.names() == [str(tmp_path / "dir" / "a.png"), f"{tmp_path / 'more.zip'}:z.png"]
    assert px(src.load(1)) == (9, 9, 9) and px(src.load(-2)) == (1, 1, 1)


# ----------------------------------------------------------------------------- zip archives


@pytest.fixture
def archive(tmp_path) -> Path:
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("b/2.png", encode(Image.new("RGB", (3, 3), (0, 0, 200)), "PNG"))
        zf.writestr("a.jpg", encode(Image.new("RGB", (8, 8), (200, 0, 0)), "JPEG", quality=95))
        zf.writestr("b/", b"")
        zf.writestr("b/readme.txt", b"text")
        zf.writestr("__MACOSX/b/._2.png", b"resource fork")
        zf.writestr("b/.DS_Store", b"junk")
        zf.writestr("bad.png", b"not a png at all")
    return path


def test_zip_source_reads_members_in_place(archive):
    src = as_source(archive)
    assert isinstance(src, ZipSource)
    assert src.names() == ["a.jpg", "b/2.png", "bad.png"]
    assert px(src.load(1)) == (0, 0, 200)
    assert src.read_bytes(1).startswith(b"\x89PNG")
    with pytest.raises(BadImageError, match=r"photos\.zip:bad\.png: not an image"):
        src.load(2)


def test_zip_source_pickles_without_its_file_handle(archive):
    src = ZipSource(archive, members=["b/2.png", "a.jpg"])
    src.load(0)  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(src))
    assert clone._archive is None
    r, g, b = px(clone.load(1))
    assert r > 190 and g < 10 and b < 10
    assert clone.names() == ["b/2.png", "a.jpg"]


def test_zip_errors(tmp_path, archive):
    with pytest.raises(BadImageError, match=r"photos\.zip:missing\.png: cannot read"):
        ZipSource(archive, members=["missing.png"]).load(0)
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="fake.zip"):
        as_source(tmp_path / "fake.zip")
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as zf:
        zf.writestr("readme.txt", b"text")
    with pytest.raises(ValueError, match="no images .* in zip archive .*text.zip"):
        as_source(tmp_path / "text.zip")


# ----------------------------------------------------------------------------- as_source


def test_as_source_in_memory_inputs():
    pil = as_source([Image.new("L", (2, 2), 5), Image.new("RGBA", (2, 2), (0, 0, 0, 0))])
    assert isinstance(pil, PILSource) and pil.names() == ["images[0]", "images[1]"]
    assert px(pil.load(0)) == (5, 5, 5) and px(pil.load(1)) == (255, 255, 255)
    arrays = as_source([np.zeros((2, 3), np.uint8), np.ones((4, 4, 3), np.float32)])  # different shapes
    assert isinstance(arrays, ArraySource) and arrays.load(1).size == (4, 4) and px(arrays.load(1)) == (255,) * 3
    stacked = as_source(np.zeros((5, 4, 4), np.uint8))
    assert len(stacked) == 5 and stacked.name(4) == "array[4]"
    assert pickle.loads(pickle.dumps(pil)).load(0).getpixel((0, 0)) == (5, 5, 5)
    assert as_source(stacked) is stacked


def test_as_source_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="empty"):
        as_source([])
    with pytest.raises(TypeError, match="cannot read images from int; expected .*folder"):
        as_source(42)
    with pytest.raises(TypeError, match="list"):
        as_source(["a.png", Image.new("L", (1, 1))])
    with pytest.raises(ValueError, match=r"ambiguous array shape \(32, 32, 3\)"):
        as_source(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        as_source("no_such_dir")


def test_image_source_is_the_common_base():
    assert all(issubclass(c, ImageSource) for c in (FileSource, ZipSource, PILSource, ArraySource))
    assert {".jpg", ".png", ".tiff", ".webp", ".pgm"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_and_crop_is_torchvision_resize_and_center_crop(interpolation):
    import torchvision.transforms.functional as TF

    from dn2.images import resize_and_crop

    mode = getattr(TF.InterpolationMode, interpolation.upper())
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (480, 640), (224, 224), (256, 300), (3, 40), (1000, 63), (100, 100), (7, 5)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for resize, crop in [(256, 224), (224, 224), (100, 150)]:
            expected = TF.center_crop(TF.resize(image, resize, interpolation=mode), [crop, crop])
            got = resize_and_crop(image, resize, crop, interpolation)
            assert got.size == (crop, crop)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"{w}x{h} {resize}/{crop}")


def test_resize_and_crop_of_a_long_strip_computes_only_the_crop():
    from dn2.backbones import Preprocessing
    from dn2.features import preprocess
    from dn2.images import resize_and_crop

    y = np.arange(40_000, dtype=np.float64)[:, None]
    strip = Image.fromarray(np.repeat((y % 256).astype(np.uint8), 2, axis=1)).convert("RGB")  # 2 x 40,000
    out = resize_and_crop(strip, 256, 224)  # the whole resize would be 256 x 5.1 million pixels
    assert out.size == (224, 224)
    # the crop comes from the middle rows of the strip, resized by 128: rows 19,992..20,008 or so
    middle = np.asarray(strip)[19_990:20_010, 0, 0]
    assert np.asarray(out)[:, :, 0].min() >= middle.min() - 1 and np.asarray(out)[:, :, 0].max() <= middle.max() + 1
    assert tuple(preprocess(strip, Preprocessing()).shape) == (3, 224, 224)


# ----------------------------------------------------------------------------- registry, names, settings


def test_a_new_source_kind_is_one_class_and_one_registration(monkeypatch):
    from dn2.images import SOURCE_KINDS, register_source

    class RepeatSource(ImageSource):
        """("repeat", image, n): one PIL image n times."""

        def __init__(self, image, n):
            self.image, self.n = image, n

        @classmethod
        def accepts(cls, X):
            return isinstance(X, tuple) and len(X) == 3 and X[0] == "repeat"

        @classmethod
        def from_input(cls, X):
            return cls(X[1], X[2])

        def __len__(self):
            return self.n

        def name(self, i):
            return f"repeat[{i}]"

        def load(self, i, max_side=None):
            return open_image(self.image, self.name(i))

    monkeypatch.setattr("dn2.images.sources.SOURCE_KINDS", list(SOURCE_KINDS))
    with pytest.raises(TypeError, match="cannot read images from tuple"):
        as_source(("repeat", Image.new("L", (2, 2), 4), 3))
    register_source(RepeatSource)
    src = as_source(("repeat", Image.new("L", (2, 2), 4), 3))
    assert isinstance(src, RepeatSource) and src.names() == ["repeat[0]", "repeat[1]", "repeat[2]"]
    assert px(src.load(2)) == (4, 4, 4) and len(src.fingerprint()) == 64  # the default fingerprint: pixels
    assert as_source([Image.new("L", (1, 1))]).names() == ["images[0]"]  # the built-in kinds still answer


def test_printable_names():
    from dn2.images import printable

    assert printable("ok/name.png") == "ok/name.png"
    assert printable(b"caf\xe9.png") == "caf\\xe9.png"
    assert printable("caf\udce9.png") == "caf\\xe9.png"  # how os.listdir shows that byte
    assert printable("bell\a\n.png") == "bell\\x07\\x0a.png"
    assert printable(Path("x") / "\udcff") == "x/\\xff"


def test_zip_listing_rule_is_shared_by_sources_and_datasets(tmp_path):
    from dn2.datasets import load_dataset
    from dn2.images import image_members, list_zip_images

    names = ["train/a/1.png", "train/a/.2.png", "train/.cache/a/3.png", "__MACOSX/train/a/._1.png",
             "test/a/4.JPG", "test/a/", "test/a/notes.txt", "test/b/5.webp"]
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, b"" if n.endswith("/") else encode(Image.new("L", (2, 2)), "PNG"))
    assert image_members(names) == ["test/a/4.JPG", "test/b/5.webp", "train/a/1.png"]
    assert list_zip_images(path) == ZipSource(path).members == image_members(names)
    ds = load_dataset(path)
    assert sorted(ds.train.source.names() + ds.test.source.names()) == image_members(names)


def test_limits_are_settings():
    from dn2 import config

    settings = config.get_config()
    assert settings["image_memory"] == 128 and settings["max_file_bytes"] == 64 * 2**20
    assert settings["max_compression_ratio"] == 100
    with pytest.raises(ValueError, match="image_memory must be a positive integer"):
        config.set_config(image_memory=0)
    import os
    import subprocess
    import sys

    env = {**os.environ, "DN2_IMAGE_MEMORY": "7", "DN2_MAX_FILE_BYTES": "1234", "DN2_MAX_COMPRESSION_RATIO": "9"}
    code = (  # dn2.config alone, without dn2/__init__ (which imports torch)
        "import sys, types; p = types.ModuleType('dn2'); p.__path__ = [sys.argv[1]]; sys.modules['dn2'] = p; "
        "from dn2 import config; s = config.get_config(); "
        "print(s['image_memory'], s['max_file_bytes'], s['max_compression_ratio'])"
    )
    package = str(Path(config.__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, package], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["7", "1234", "9"]


@pytest.mark.parametrize(
    "module",
    ["dn2.images", "dn2.images.errors", "dn2.images.files", "dn2.images.archives", "dn2.images.decode",
     "dn2.images.sources", "dn2.datasets", "dn2.datasets.core", "dn2.datasets.layout", "dn2.config"],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
