"""Heat-map overlays on synthetic maps, the verdict records, and the static report of dn2 score --report."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import dn2
from dn2.cli import main
from dn2.review import anomaly_maps, heatmap_overlay, maps_enabled, report_records, write_report
from dn2.review.report import report_html


def _rgb(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _square_map(h=60, w=80, value=3.0) -> np.ndarray:
    amap = np.full((h, w), 0.2, np.float32)
    amap[20:40, 30:50] = value
    return amap


def test_overlay_colours_high_regions_and_draws_the_threshold_contour():
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    out = _rgb(heatmap_overlay(grey, _square_map(), threshold=1.0))
    assert out.shape == (60, 80, 3)
    inside, outside = out[28:32, 38:42].reshape(-1, 3).mean(0), out[5:10, 5:10].reshape(-1, 3).mean(0)
    assert inside[0] > outside[0] + 60  # warm (inferno's yellow) where the map is high
    assert abs(outside - 128).max() < 60  # the image still shows through where it is low
    assert (out[20, 30:50] == 255).all() and (out[19, 35] == 20).all()  # white inside the contour, dark outside it
    without = _rgb(heatmap_overlay(grey, _square_map(), threshold=None))
    assert not (without == 255).all(axis=-1).any()  # no threshold, no contour


def test_overlay_scale_is_anchored_at_the_threshold_so_colours_compare_across_images():
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    a = _rgb(heatmap_overlay(grey, _square_map(value=1.5), threshold=1.0))
    b = _rgb(heatmap_overlay(grey, _square_map(value=30.0), threshold=1.0))
    np.testing.assert_array_equal(a[5:10, 5:10], b[5:10, 5:10])  # the same low value looks the same
    assert (a[28:32, 38:42] != b[28:32, 38:42]).any()


def test_overlay_resizes_the_map_shrinks_big_images_and_survives_nan():
    big = Image.new("RGB", (1600, 1000), "white")
    small_map = _square_map(30, 48)
    small_map[0, 0] = np.nan
    out = Image.open(io.BytesIO(heatmap_overlay(big, small_map, threshold=1.0)))
    assert out.size == (512, 320)
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(big, np.zeros((2, 3, 4)), 1.0)


def _maps_model(folder, **options):
    """A small real model with anomaly maps (DN2(maps="spade"))."""
    return dn2.DN2(preset="paper", maps="spade", map_backbone="efficientnet_lite0", map_size=96, runtime="torch",
                   progress=False, **options).fit(folder)


def test_models_with_maps_get_heat_maps_in_records_service_and_report(image_folders, tmp_path):
    plain = dn2.DN2(preset="paper", progress=False).fit(image_folders["normal"])
    assert not maps_enabled(plain) and anomaly_maps(plain, [Image.new("RGB", (8, 8))]) is None
    model = _maps_model(image_folders["normal"])
    assert maps_enabled(model)
    source = dn2.images.as_source(image_folders["test"])
    emb = model.embed(source)
    records = report_records(model, source, emb, explain=2)
    assert all(r["heatmap"].startswith("data:image/png;base64,") for r in records)
    assert [r["anomaly_score"] for r in records] == pytest.approx(list(model.anomaly_score(source)))

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dn2.serve import ServedModel, create_app

    app = create_app({"maps": ServedModel("maps", model, tmp_path / "maps.dn2")})
    png = io.BytesIO()
    Image.open(image_folders["test"] / "bad" / "b0.jpg").save(png, format="PNG")
    with TestClient(app) as client:
        result = client.post("/v1/score", files=[("files", ("b0.png", png.getvalue()))]).json()["results"][0]
        info = client.get("/v1/models").json()["models"][0]
    assert info["maps"] is True
    assert result["heatmap"].startswith("data:image/png;base64,") and result["verdict"] == "anomaly"


def test_a_model_with_its_own_image_score_is_judged_by_it_in_records(image_folders):
    model = _maps_model(image_folders["normal"], image_score="combined")
    source = dn2.images.as_source(image_folders["test"])
    records = report_records(model, source, model.embed(source), explain=1)
    combined = model.anomaly_score(source)
    assert [r["anomaly_score"] for r in records] == pytest.approx(list(combined), rel=1e-4, abs=1e-4)  # one image a batch
    assert all(r["threshold"] == pytest.approx(model.threshold_) for r in records)
    assert model.threshold_ != model.detector.threshold_  # the combined rule has its own threshold
    assert [r["verdict"] for r in records] == ["anomaly" if s > model.threshold_ else "normal" for s in combined]


def test_score_report_shows_sorted_verdicts_thumbnails_and_refuses_to_overwrite(image_folders, tmp_path, capsys):
    model = tmp_path / "m.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--preset", "paper", "--thumbnails", "48", "--quiet"]) == 0
    report = tmp_path / "review"
    (image_folders["test"] / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        code = main(["score", str(model), str(image_folders["test"]), "--report", str(report), "--quiet", "--skip-bad"])
    assert code == 1  # done, one input skipped
    assert f"wrote report {report / 'index.html'}" in capsys.readouterr().out
    (image_folders["test"] / "broken.png").unlink()
    page = (report / "index.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="dn2-data">(.*?)</script>', page, re.S).group(1))
    results, skipped = data["results"][:-1], data["results"][-1]
    assert skipped["name"] == "broken.png" and "not an image" in skipped["error"]  # listed last, with the reason
    scores = [r["anomaly_score"] for r in results]
    assert scores == sorted(scores, reverse=True)  # most anomalous first
    assert [r["verdict"] for r in results[:3]] == ["anomaly"] * 3 and {r["name"][:3] for r in results[:3]} == {"bad"}
    assert all(len(r["nearest"]) == 3 for r in results)  # --explain defaults to 3 in a report
    assert all(n["thumbnail"].startswith("data:image/jpeg;base64,") for r in results for n in r["nearest"])
    assert all(r["image"].startswith("data:image/jpeg;base64,") for r in results)
    assert "DN2Review" in page and "--radius" in page  # the page's own script and style sheet, inline
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained: nothing fetched
    assert "<noscript><table>" in page

    before = (report / "index.html").read_bytes()
    assert main(["score", str(model), str(image_folders["test"]), "--report", str(report), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and (report / "index.html").read_bytes() == before
    assert main(["score", str(model), str(image_folders["test"]), "--report", str(report), "--quiet", "--force"]) == 0


def test_report_of_a_model_without_thumbnails_and_hostile_names(tmp_path):
    rec = {"name": "</script><script>alert(1)</script>&.png", "anomaly_score": 2.0, "verdict": "anomaly",
           "threshold": 1.0, "nearest": [{"name": "n<1>.png", "distance": 1.5, "thumbnail": None}],
           "heatmap": None, "error": None}
    bad = {"name": "x.png", "anomaly_score": None, "verdict": None, "threshold": None, "nearest": [],
           "heatmap": None, "error": "x.png: not an image"}
    page = report_html([bad, rec], title="t")
    assert "<script>alert" not in page and "\\u003c/script\\u003e" in page
    data = json.loads(re.search(r'id="dn2-data">(.*?)</script>', page, re.S).group(1))
    assert [r["name"] for r in data["results"]] == [rec["name"], "x.png"]  # unscored images last
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("")
        write_report(tmp_path / "file", [rec], title="t")
