"""Localisation datasets with ground-truth masks: an MVTec AD category folder and a Magnetic-Tile-Defects-like
zip, generated here; bad masks (missing, wrong size or mode, empty) are clear errors naming the file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2.datasets import MaskedDataset, decode_mask, describe, load_dataset


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def mvtec(root: Path, n_train: int = 5) -> Path:
    """bottle/train/good (n_train), test/good (2), test/crack (2 with masks), test/hole (1 with mask)."""
    cat = root / "bottle"
    rng = np.random.default_rng(0)
    for folder, names in [("train/good", [f"{i:03d}" for i in range(n_train)]), ("test/good", ["000", "001"]),
                          ("test/crack", ["000", "001"]), ("test/hole", ["000"])]:
        (cat / folder).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(cat / folder / f"{name}.png")
            if folder.startswith("test/") and not folder.endswith("good"):
                defect = folder.split("/")[1]
                (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((40, 60), np.uint8)
                mask[10:20, 20:35] = 255
                (cat / "ground_truth" / defect / f"{name}_mask.png").write_bytes(png(mask))
    return cat


def mtd_zip(path: Path, n_free: int = 10, empty_mask: bool = False) -> Path:
    """MT_Free (n_free, in two 'sessions'), MT_Crack (3) and MT_Fray (2), each image with its mask."""
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w") as z:
        for kind, names in [("MT_Free", [f"exp{i // 5}_num_{i}" for i in range(n_free)]),
                            ("MT_Crack", ["exp0_num_90", "exp1_num_91", "exp1_num_92"]), ("MT_Fray", ["exp0_num_95", "exp1_num_96"])]:
            for name in names:
                h, w = int(rng.integers(30, 50)), int(rng.integers(30, 70))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "JPEG")
                z.writestr(f"{kind}/Imgs/{name}.jpg", buf.getvalue())
                mask = np.zeros((h, w), np.uint8)
                if kind != "MT_Free" and not (empty_mask and name == "exp1_num_92"):
                    mask[5:15, 5:15] = 255
                z.writestr(f"{kind}/Imgs/{name}.png", png(mask))
    return path


def test_mvtec_category_with_masks(tmp_path):
    ds = load_dataset(mvtec(tmp_path))  # detected before the class-folder reader, which would take test/ for classes
    assert isinstance(ds, MaskedDataset) and ds.name == "bottle"
    assert ds.classes == ["good", "crack", "hole"] and ds.normal == 0
    assert (ds.train.labels == 0).all() and len(ds.train) == 5
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.test.source.names()[2] == "test/crack/000.png"
    mask = ds.masks.load(2, (40, 60))
    assert mask.shape == (40, 60) and mask.sum() == 150 and mask[10, 20]
    assert not ds.masks.load(0, (40, 60)).any()  # a normal test image has an empty mask
    assert "bottle: 3 classes" in describe(ds)


def test_mvtec_errors_name_the_mask(tmp_path):
    cat = mvtec(tmp_path)
    missing = cat / "ground_truth" / "hole" / "000_mask.png"
    missing.rename(missing.with_name("elsewhere.png"))
    with pytest.raises(ValueError, match="000_mask.png of defective image .*hole/000.png is missing"):
        load_dataset(cat)
    missing.with_name("elsewhere.png").rename(missing)
    ds = load_dataset(cat)
    with pytest.raises(ValueError, match=r"crack/000_mask.png is 40 x 60 \(H x W\), its image is 41 x 60"):
        ds.masks.load(2, (41, 60))
    (cat / "ground_truth" / "crack" / "000_mask.png").write_bytes(png(np.zeros((40, 60, 3), np.uint8)))
    with pytest.raises(ValueError, match="crack/000_mask.png must be a one-channel image .* got mode RGB"):
        ds.masks.load(2, (40, 60))
    (cat / "ground_truth" / "crack" / "000_mask.png").write_bytes(png(np.zeros((40, 60), np.uint8)))
    with pytest.raises(ValueError, match="crack/000_mask.png marks no defect pixel"):
        ds.masks.load(2, (40, 60))
    (cat / "ground_truth" / "crack" / "000_mask.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="crack/000_mask.png cannot be read"):
        ds.masks.load(2, (40, 60))


def test_mtd_zip_fixed_split_is_the_first_80_percent_by_name(tmp_path):
    ds = load_dataset(mtd_zip(tmp_path / "mtd.zip"))
    assert isinstance(ds, MaskedDataset) and ds.classes == ["MT_Free", "MT_Crack", "MT_Fray"]
    free = sorted(f"MT_Free/Imgs/exp{i // 5}_num_{i}.jpg" for i in range(10))
    assert ds.train.source.names() == free[:8]
    assert ds.test.source.names()[:2] == free[8:]  # the last session's images: unseen in training
    assert ds.test.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    source = ds.test.source
    image = source.load(3)
    mask = ds.masks.load(3, (image.height, image.width))
    assert mask[5:15, 5:15].all() and mask.sum() == 100
    assert ds.masks.name(3).endswith("mtd.zip:MT_Crack/Imgs/exp1_num_91.png")


def test_mtd_mixed_split_is_asked_for_by_name(tmp_path):
    ds = load_dataset(mtd_zip(tmp_path / "mtd.zip"), format="mtd-mixed")
    test_free = [n for n, c in zip(ds.test.source.names(), ds.test.labels) if c == 0]
    assert test_free == ["MT_Free/Imgs/exp0_num_4.jpg", "MT_Free/Imgs/exp1_num_9.jpg"]  # every 5th: every session
    assert len(ds.train) == 8 and ds.name == "mtd-mixed"


def test_mtd_missing_and_empty_masks(tmp_path):
    path = mtd_zip(tmp_path / "mtd.zip", empty_mask=True)
    ds = load_dataset(path)
    index = ds.test.source.names().index("MT_Crack/Imgs/exp1_num_92.jpg")
    image = ds.test.source.load(index)
    # the archive as distributed has defect masks that mark nothing: allowed, documented
    assert not ds.masks.load(index, (image.height, image.width)).any()
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            if name != "MT_Fray/Imgs/exp0_num_95.png":
                dst.writestr(name, src.read(name))
    with pytest.raises(ValueError, match="mask MT_Fray/Imgs/exp0_num_95.png of defective image .* is missing"):
        load_dataset(broken)


def test_mtd_folder_and_zip_read_the_same(tmp_path):
    path = mtd_zip(tmp_path / "mtd.zip")
    folder = tmp_path / "mtd"
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    a, b = load_dataset(path), load_dataset(folder)
    assert a.test.source.names() == b.test.source.names() and a.classes == b.classes
    np.testing.assert_array_equal(np.asarray(a.test.source.load(4)), np.asarray(b.test.source.load(4)))


def test_decode_mask_modes():
    one_bit = np.zeros((3, 4), bool)
    one_bit[1, 2] = True
    assert decode_mask(png(one_bit), "bits.png").tolist() == one_bit.tolist()
    assert decode_mask(png(np.full((2, 2), 127, np.uint8)), "grey.png").sum() == 0  # > 127 is defect
    with pytest.raises(ValueError, match="mode I;16"):
        decode_mask(png(np.zeros((2, 2), np.uint16)), "deep.png")
