"""Thumbnails of the memory images in the model file: made at fit time, aligned with the memory, checked on load."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import dn2
from dn2.cli import main
from dn2.modelfile import ModelFileError, read_model, write_model
from dn2.thumbnails import Thumbnails, make_thumbnail, pack


def _decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def _matches(jpeg: bytes, path) -> bool:
    """The thumbnail shows the image at ``path`` (JPEG is lossy: compare with a fresh thumbnail of it)."""
    expected = _decoded(make_thumbnail(Image.open(path), 32))
    got = _decoded(jpeg)
    return got.shape == expected.shape and float(np.abs(got - expected).mean()) < 3.0


def test_fit_keeps_one_thumbnail_per_memory_image_and_save_load_keeps_them(image_folders, tmp_path):
    model = dn2.DN2(preset="paper", progress=False, thumbnails=32).fit(image_folders["normal"])
    thumbs = model.thumbnails_
    names = model.detector.memory_names_
    assert len(thumbs) == len(names) == 12 and thumbs.size == 32
    for i, name in enumerate(names):
        assert Image.open(io.BytesIO(thumbs[i])).size == (32, 32)  # 48 px squares shrunk to 32
        assert _matches(thumbs[i], image_folders["normal"] / name)

    loaded = dn2.load(model.save(tmp_path / "m.dn2"))
    assert loaded.thumbnails == 32
    assert [loaded.thumbnails_[i] for i in range(12)] == [thumbs[i] for i in range(12)]
    header, tensors = read_model(tmp_path / "m.dn2")
    assert header["thumbnails"] == {"size": 32, "format": "JPEG", "count": 12}
    assert tensors["thumbnails/data"].dtype == np.uint8


def test_thumbnails_follow_cleaning_and_skipped_images(image_folders):
    folder = image_folders["normal"]
    (folder / "n05b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # sorts between n05 and n06
    with pytest.warns(UserWarning, match="broken"):
        model = dn2.DN2(preset="paper", progress=False, skip_bad=True, clean=0.25, thumbnails=32).fit(folder)
    names = model.detector.memory_names_
    assert len(names) == 9 and len(model.thumbnails_) == 9
    for i, name in enumerate(names):
        assert _matches(model.thumbnails_[i], folder / name), name


def test_models_without_thumbnails_still_load(image_folders, tmp_path):
    model = dn2.DN2(preset="paper", progress=False).fit(image_folders["normal"])
    assert model.thumbnails_ is None
    loaded = dn2.load(model.save(tmp_path / "plain.dn2"))
    assert loaded.thumbnails_ is None and loaded.thumbnails is None
    assert "thumbnails" not in read_model(tmp_path / "plain.dn2")[0]


def test_thumbnails_need_memory_images_and_a_sane_size():
    with pytest.raises(ValueError, match="n_centres"):
        dn2.DN2(thumbnails=96, n_centres=4).check_params()
    with pytest.raises(ValueError, match="thumbnails"):
        dn2.DN2(thumbnails=4).check_params()


def test_hostile_thumbnail_state_is_refused_with_a_clear_error():
    good = pack([make_thumbnail(Image.new("RGB", (20, 10), "blue"), 16)] * 2, 16)
    header, tensors = good.to_state()
    assert len(Thumbnails.from_state(header, tensors, 2)) == 2

    def refused(match, header=header, n=2, **changes):
        with pytest.raises(ValueError, match=match):
            Thumbnails.from_state(header, {**tensors, **changes}, n)

    refused("for 3 memory images", n=3)
    refused("size", header={**header, "size": 10_000})
    refused("format", header={**header, "format": "PNG"})
    refused("do not split", **{"thumbnails/offsets": np.array([0, 5, 10**9], np.int64)})
    refused("do not split", **{"thumbnails/offsets": good.offsets[::-1].copy()})
    refused("int64", **{"thumbnails/offsets": good.offsets.astype(np.int32)})
    refused("not a JPEG", **{"thumbnails/data": np.concatenate([[0], good.data[1:]]).astype(np.uint8)})
    with pytest.raises(ValueError, match="without a 'thumbnails' header"):
        Thumbnails.from_state(None, tensors, 2)


def test_load_names_the_file_with_bad_thumbnails(image_folders, tmp_path):
    model = dn2.DN2(preset="paper", progress=False, thumbnails=32).fit(image_folders["normal"])
    header, tensors = read_model(model.save(tmp_path / "m.dn2"))
    header["thumbnails"]["count"] = 11  # a consistent file (digests rewritten) with a wrong field
    write_model(tmp_path / "bad.dn2", header, tensors)
    with pytest.raises(ModelFileError, match="bad.dn2.*11 thumbnails for 12"):
        dn2.load(tmp_path / "bad.dn2")


def test_cli_fit_with_thumbnails(image_folders, tmp_path, capsys):
    out = tmp_path / "t.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(out), "--preset", "paper", "--thumbnails", "--quiet"]) == 0
    assert read_model(out)[0]["thumbnails"]["size"] == 96
