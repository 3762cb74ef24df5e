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


def test_python_api_matches_the_cli_model(image_folders, tmp_path, capsys):
    """`dn2 fit` and `DN2().fit` with the same settings give the same model: same scores, threshold, backbone."""
    cli_path = tmp_path / "cli.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(cli_path), "--quiet", "--k", "3", "--fpr", "0.1"]) == 0
    from_cli = dn2.load(cli_path)
    model = dn2.DN2(k=3, fpr=0.1, progress=False).fit(image_folders["normal"])
    from_api = dn2.load(model.save(tmp_path / "api.dn2"))
    test = image_folders["test"]
    np.testing.assert_array_equal(from_cli.anomaly_score(test), from_api.anomaly_score(test))
    np.testing.assert_array_equal(from_api.anomaly_score(test), model.anomaly_score(test))
    assert from_cli.threshold_ == model.threshold_ and from_cli.method_ == model.method_
    assert from_cli.embedder.identity() == model.embedder.identity()


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
        code = main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet", "--skip-bad"])
    captured = capsys.readouterr()
    assert code == 1  # done, but something was skipped
    assert "fitted on 12 of 12" in captured.out and "skipped" in captured.err and "broken.png" in captured.err


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


@pytest.mark.parametrize("bad", [
    ["--k", "0"], ["--fpr", "2"], ["--clean", "1.5"], ["--contamination", "0.7"], ["--n-centres", "0"],
    ["--index", "ivf", "--index-param", "nprob=3"], ["--index", "annoy"], ["--batch-size", "0"], ["--workers", "-1"],
])
def test_fit_reports_bad_parameters_before_embedding_anything(bad, image_folders, tmp_path, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("an image was embedded before the parameters were checked")

    monkeypatch.setattr(dn2.Embedder, "embed", must_not_run)
    code = main(["fit", str(image_folders["normal"]), "-o", str(tmp_path / "m.dn2"), "--quiet", *bad])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dn2: error:") and "Traceback" not in err
    assert not (tmp_path / "m.dn2").exists()


@pytest.mark.parametrize("output, problem", [
    ("missing/m.dn2", "does not exist"), ("a_folder", "is a folder"), ("x" * 300 + ".dn2", "too long"),
])
def test_bad_output_paths_are_one_line_errors_before_any_work(output, problem, image_folders, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_folder").mkdir()
    monkeypatch.setattr(dn2.Embedder, "embed", lambda *a, **k: pytest.fail("embedded before checking the output"))
    assert main(["fit", str(image_folders["normal"]), "-o", str(tmp_path / output), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1


def test_score_checks_the_csv_path_before_loading_or_embedding(tmp_path, capsys):
    assert main(["score", str(tmp_path / "no-model.dn2"), str(tmp_path), "--csv", str(tmp_path / "nope" / "s.csv")]) == 2
    assert "nope" in capsys.readouterr().err  # the CSV path is named, not the missing model


def test_csv_is_written_atomically_and_an_old_one_survives_a_failure(image_folders, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--quiet", "--weights", "random",
                 "--backbone", "efficientnet_lite0"]) == 0
    out = tmp_path / "s.csv"
    out.write_text("precious")

    def broken_writerows(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", broken_writerows)
    assert main(["score", str(model), str(image_folders["test"]), "--csv", str(out), "--force", "--quiet",
                 "--weights", "random"]) == 2
    assert out.read_text() == "precious" and "disk full" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind


def test_skipped_images_keep_their_place_in_the_api_and_the_csv(image_folders, tmp_path, capsys):
    """A bad image among good ones: its score is NaN and its verdict 0 in Python, 'skipped' with the reason
    in the CSV; every other score stays on its own image."""
    model = dn2.DN2(backbone="efficientnet_lite0", weights="random", progress=False).fit(image_folders["normal"])
    good = sorted(image_folders["test"].rglob("*.*"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    inputs = [good[0], bad, *good[1:]]
    reference = model.anomaly_score(good)
    model.set_params(skip_bad=True)
    with pytest.warns(UserWarning, match="broken.png"):
        scores = model.anomaly_score(inputs)
    assert len(scores) == len(inputs) and np.isnan(scores[1])
    np.testing.assert_allclose(np.delete(scores, 1), reference, rtol=1e-6)
    with pytest.warns(UserWarning):
        assert model.predict(inputs)[1] == 0
    with pytest.warns(UserWarning):
        assert model.nearest(inputs, n=2)[1] == []

    path = model.save(tmp_path / "m.dn2")
    out = tmp_path / "s.csv"
    with pytest.warns(UserWarning):
        code = main(["score", str(path), *map(str, inputs), "--csv", str(out), "--skip-bad", "--quiet"])
    assert code == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows][1].endswith("broken.png")
    assert rows[1]["verdict"] == "skipped" and "not an image" in rows[1]["reason"]
    assert all(r["verdict"] in ("normal", "anomaly") for i, r in enumerate(rows) if i != 1)
