"""The dn2 command end to end on small generated images, as a user would run it."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import dn2
from dn2.cli import main
from dn2.modelfile import ModelFileError


def test_fit_then_score_flags_the_odd_images(image_folders, tmp_path, capsys):
    model = tmp_path / "stripes.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet"]) == 0
    assert "fitted on 12 of 12 images" in capsys.readouterr().out

    out_csv = tmp_path / "scores.csv"
    assert main(["score", str(model), str(image_folders["test"]), "--csv", str(out_csv), "--explain", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "nearest: n" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == ["bad/b0.jpg", "bad/b1.jpg", "bad/b2.jpg", "good/g0.png", "good/g1.png", "good/g2.png"]
    scores = {r["image"]: float(r["anomaly_score"]) for r in rows}
    assert min(v for k, v in scores.items() if k.startswith("bad")) > max(v for k, v in scores.items() if k.startswith("good"))
    assert {r["verdict"] for r in rows if r["image"].startswith("bad")} == {"anomaly"}
    assert rows[0]["nearest_1"].startswith("n") and float(rows[0]["distance_2"]) >= float(rows[0]["distance_1"])


def test_python_api_matches_the_cli_model(image_folders, tmp_path):
    model = dn2.DN2(progress=False).fit(image_folders["normal"])
    path = model.save(tmp_path / "m.dn2")
    loaded = dn2.load(path)
    test = image_folders["test"]
    np.testing.assert_array_equal(loaded.anomaly_score(test), model.anomaly_score(test))
    assert loaded.threshold_ == model.threshold_
    assert loaded.embedder.identity() == model.embedder.identity()


def test_model_and_csv_are_never_overwritten_without_force(image_folders, tmp_path, capsys):
    model = tmp_path / "m.dn2"
    model.write_bytes(b"precious")
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert model.read_bytes() == b"precious"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet", "--force"]) == 0
    out_csv = tmp_path / "keep.csv"
    out_csv.write_text("mine")
    assert main(["score", str(model), str(image_folders["test"]), "--csv", str(out_csv), "--quiet"]) == 2
    assert out_csv.read_text() == "mine"


def test_corrupt_image_is_named_or_skipped(image_folders, tmp_path, capsys):
    bad = image_folders["normal"] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = tmp_path / "m.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not model.exists()
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "fitted on 12 of 12" in captured.out and "skipped 1 bad image" in captured.err


def test_empty_folder_and_wrong_model_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m.dn2"), "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "fake.dn2").write_bytes(b"not a model")
    assert main(["score", str(tmp_path / "fake.dn2"), str(tmp_path), "--quiet"]) == 2
    assert "fake.dn2" in capsys.readouterr().err


def test_model_fitted_with_other_weights_is_a_mismatch(image_folders, tmp_path):
    from safetensors.torch import save_file

    from dn2.backbones import load_backbone

    model = dn2.DN2(backbone="efficientnet_lite0", weights="random", progress=False).fit(image_folders["normal"])
    path = model.save(tmp_path / "random.dn2")
    other = {k: v + 0.01 for k, v in load_backbone("efficientnet_lite0", weights="random").body.state_dict().items()
             if v.is_floating_point()}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="backbone mismatch"):
        dn2.load(path, weights=tmp_path / "other.safetensors")
    assert main(["score", str(path), str(image_folders["test"]), "--weights", str(tmp_path / "other.safetensors")]) == 2


def test_backbones_lists_offline_and_download(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "offline" in out
    assert "resnet101" in out


def test_demo_on_a_reduced_digits_set(capsys):
    assert main(["demo", "--per-class", "12", "--quiet"]) == 0
    out = capsys.readouterr().out
    mean = float(out.split("mean |")[1].split()[0])
    assert 60.0 < mean <= 100.0  # far above chance even on 6 training images per digit


def test_fit_takes_a_preset_and_overrides(image_folders, tmp_path, capsys):
    path = tmp_path / "paper.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(path), "--quiet", "--preset", "paper",
                 "--normalize", "l2", "--k", "3"]) == 0
    model = dn2.load(path)
    assert (model.method_.backbone, model.method_.k, model.method_.normalize) == ("efficientnet_lite0", 3, "l2")
    assert model.detector.normalize == "l2"


def test_fit_with_the_approximate_index_and_its_parameters(image_folders, tmp_path, capsys):
    path = tmp_path / "ivf.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(path), "--quiet", "--index", "ivf",
                 "--index-param", "nlist=2", "--index-param", "nprobe=2"]) == 0
    model = dn2.load(path)
    assert model.detector.index == "ivf" and model.detector.index_params == {"nlist": 2, "nprobe": 2}
    assert len(model.detector.index_.centres_) == 2  # rebuilt with the saved parameters on load
    assert main(["fit", str(image_folders["normal"]), "-o", str(tmp_path / "x.dn2"), "--quiet", "--index", "ivf",
                 "--index-param", "nprob=2"]) == 2
    assert "nprob" in capsys.readouterr().err and not (tmp_path / "x.dn2").exists()
