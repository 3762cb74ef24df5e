"""The maps from the command line: dn2 fit --maps, dn2 score --map-dir, dn2 bench localize."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

import dn2
from dn2.cli import main
from test_maps import texture
from test_maps_datasets import mvtec

FAST = ["--backbone", "efficientnet_lite0", "--map-backbone", "efficientnet_lite0", "--map-size", "64",
        "--runtime", "torch", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps-cli")
    (root / "normal").mkdir()
    (root / "new").mkdir()
    for i in range(8):
        texture(i).save(root / "normal" / f"n{i}.png")
    texture(100).save(root / "new" / "good.png")
    texture(101, defect=True).resize((150, 90)).save(root / "new" / "bad.jpg")
    return root


@pytest.fixture(scope="module")
def model_file(folders):
    path = folders / "maps.dn2"
    assert main(["fit", str(folders / "normal"), "-o", str(path), "--maps", "spade", *FAST]) == 0
    return path


def test_score_writes_an_overlay_and_the_raw_map_of_every_image(model_file, folders, tmp_path, capsys):
    out, table = tmp_path / "maps", tmp_path / "scores.csv"
    code = main(["score", str(model_file), str(folders / "new"), "--map-dir", str(out), "--csv", str(table),
                 "--runtime", "torch", "--quiet"])
    assert code == 0 and "wrote 2 map overlays" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["bad.jpg.map.npy", "bad.jpg.overlay.png", "good.png.map.npy",
                                                     "good.png.overlay.png"]
    model = dn2.load(model_file, runtime="torch", progress=False)
    expected = model.anomaly_map([folders / "new" / "bad.jpg"])[0]
    raw = np.load(out / "bad.jpg.map.npy", allow_pickle=False)
    assert raw.shape == (90, 150) and raw.dtype == np.float32
    np.testing.assert_array_equal(raw, expected)
    shown = Image.open(out / "bad.jpg.overlay.png")
    assert shown.size == (150, 90) and float(shown.text["dn2:pixel_threshold"]) == model.pixel_threshold_
    rows = {r["image"]: r for r in csv.DictReader(table.open())}
    assert float(rows["bad.jpg"]["map_score"]) > float(rows["good.png"]["map_score"])
    assert float(rows["bad.jpg"]["flagged_pixels"]) > float(rows["good.png"]["flagged_pixels"])


def test_map_files_are_never_overwritten_without_force(model_file, folders, tmp_path, capsys):
    out = tmp_path / "maps"
    args = ["score", str(model_file), str(folders / "new"), "--map-dir", str(out), "--runtime", "torch", "--quiet"]
    assert main(args) == 0
    (out / "good.png.overlay.png").write_bytes(b"mine")
    assert main(args) == 2
    assert "overlay.png: file exists; use --force" in capsys.readouterr().err
    assert (out / "good.png.overlay.png").read_bytes() == b"mine"
    assert main([*args, "--force"]) == 0
    assert Image.open(out / "good.png.overlay.png").size == (120, 72)


def test_map_dir_needs_a_model_with_maps(folders, tmp_path, capsys):
    plain = tmp_path / "plain.dn2"
    assert main(["fit", str(folders / "normal"), "-o", str(plain), "--backbone", "efficientnet_lite0", "--runtime", "torch",
                 "--quiet"]) == 0
    out = tmp_path / "maps"
    assert main(["score", str(plain), str(folders / "new"), "--map-dir", str(out), "--runtime", "torch", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--map-dir" in err and "fitted without maps" in err and "--maps spade" in err
    assert not out.exists()


def test_spade_with_n_centres_fails_before_work(folders, tmp_path, capsys):
    path = tmp_path / "m.dn2"
    assert main(["fit", str(folders / "normal"), "-o", str(path), "--maps", "spade", "--n-centres", "3", *FAST]) == 2
    assert "n_centres" in capsys.readouterr().err and not path.exists()


def test_bench_localize_writes_tables_examples_and_a_report(tmp_path, capsys):
    data = mvtec(tmp_path / "data", n_train=6)
    out = tmp_path / "out"
    code = main(["bench", "localize", "--data", str(data), "--maps", "spade,patchcore", "--backbone",
                 "efficientnet_lite0", "--map-size", "64", "--runtime", "torch", "--out", str(out), "--report",
                 str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "machine: " in printed and "load average" in printed
    with (out / "localize.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["backbone"]) for r in rows] == [("spade", "efficientnet_lite0"),
                                                            ("patchcore", "efficientnet_lite0")]
    assert all(0 <= float(r["PRO"]) <= 100 and float(r["fit s"]) > 0 and float(r["model MiB"]) > 0 for r in rows)
    with (out / "localize_spade_efficientnet_lite0.csv").open() as f:
        per_type = [r["defect type"] for r in csv.DictReader(f)]
    assert per_type == ["crack", "hole", "mean", "all"]
    assert (out / "examples_spade_efficientnet_lite0.png").stat().st_size > 0
    html = (out / "index.html").read_text()
    assert "best, typical and worst" in html and "data:image/png;base64" in html


def test_bench_refuses_datasets_of_the_other_kind(tmp_path, capsys):
    data = mvtec(tmp_path / "data")
    assert main(["bench", "unimodal", "--data", str(data), "--quiet"]) == 2
    assert "dn2 bench localize" in capsys.readouterr().err
    for kind in ("a", "b"):
        (tmp_path / "classes" / kind).mkdir(parents=True)
        for i in range(3):
            texture(i).save(tmp_path / "classes" / kind / f"{i}.png")
    assert main(["bench", "localize", "--data", str(tmp_path / "classes"), "--quiet"]) == 2
    assert "masks" in capsys.readouterr().err


def test_an_unreadable_image_among_readable_ones_keeps_its_row_and_gets_no_map(model_file, folders, tmp_path, capsys):
    images = tmp_path / "mixed"
    images.mkdir()
    for name in ("a.png", "c.png"):
        (images / name).write_bytes((folders / "new" / "good.png").read_bytes())
    (images / "b.png").write_bytes(b"not an image")
    out, table = tmp_path / "maps", tmp_path / "scores.csv"
    with pytest.warns(UserWarning, match="b.png"):
        code = main(["score", str(model_file), str(images), "--map-dir", str(out), "--csv", str(table), "--skip-bad",
                     "--runtime", "torch", "--quiet"])
    assert code == 1 and "wrote 2 map overlays" in capsys.readouterr().out
    rows = list(csv.DictReader(table.open()))
    assert [(r["image"], r["verdict"]) for r in rows] == [("a.png", "normal"), ("b.png", "skipped"), ("c.png", "normal")]
    assert rows[0]["map_score"] == rows[2]["map_score"] != "" and rows[1]["map_score"] == ""
    assert sorted(p.name for p in out.iterdir()) == ["a.png.map.npy", "a.png.overlay.png", "c.png.map.npy",
                                                     "c.png.overlay.png"]


def test_a_report_of_a_model_with_maps_shows_a_heat_map_per_image(model_file, folders, tmp_path, capsys):
    report = tmp_path / "review"
    assert main(["score", str(model_file), str(folders / "new"), "--report", str(report), "--runtime", "torch",
                 "--quiet"]) == 0
    page = (report / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # a heat map of each of the two images
