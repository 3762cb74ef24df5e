"""dn2 serve's API through FastAPI's TestClient: every endpoint, auth, limits, bad images, several models, metrics."""

from __future__ import annotations

import io
import re
import sys
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import dn2  # noqa: E402
from dn2.cli import main  # noqa: E402
from dn2.config import config_context  # noqa: E402
from dn2.serve import ServeSettings, check_listen, create_app, load_models  # noqa: E402
from dn2.serve.batcher import MicroBatcher  # noqa: E402

TOKEN = "correct-horse-battery-staple"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two models on the same stripes: 'parts' (with thumbnails) and 'plain' (k=1, none); test images as bytes."""
    from conftest import make_image

    root = tmp_path_factory.mktemp("serve")
    normal = root / "normal"
    normal.mkdir()
    for i in range(12):
        make_image("stripes", i).save(normal / f"n{i:02d}.png")
    parts = dn2.DN2(preset="paper", progress=False, thumbnails=32).fit(normal)
    parts.save(root / "parts.dn2")
    dn2.DN2(preset="paper", progress=False, k=1).fit(normal).save(root / "plain.dn2")
    models = load_models([str(root / "parts.dn2"), str(root / "plain.dn2")])
    images = {"good.png": make_image("stripes", 100), "bad.png": make_image("blob", 200)}
    return {"models": models, "fitted": parts, "images": images, "bytes": {k: _png(v) for k, v in images.items()},
            "root": root}


def client_for(served, **settings) -> TestClient:
    return TestClient(create_app(served["models"], settings=ServeSettings(**settings)))


def upload(served, *names, **extra):
    return [("files", (name, served["bytes"][name], "image/png")) for name in names] + [
        ("files", item) for item in extra.get("raw", [])]


def test_score_gives_each_image_a_verdict_nearest_normals_and_the_scores_of_the_library(served):
    with client_for(served) as client:
        r = client.post("/v1/score", files=upload(served, "good.png", "bad.png"))
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "parts"  # the first model is the default
    good, bad = body["results"]
    assert (good["name"], good["verdict"], bad["name"], bad["verdict"]) == ("good.png", "normal", "bad.png", "anomaly")
    expected = served["fitted"].anomaly_score([served["images"]["good.png"], served["images"]["bad.png"]])
    np.testing.assert_allclose([good["anomaly_score"], bad["anomaly_score"]], expected, rtol=1e-5)
    assert good["threshold"] == pytest.approx(served["fitted"].threshold_)
    assert len(good["nearest"]) == 3 and good["error"] is None and good["heatmap"] is None
    distances = [n["distance"] for n in good["nearest"]]
    assert distances == sorted(distances)
    assert good["nearest"][0]["name"] == served["fitted"].nearest([served["images"]["good.png"]], 1)[0][0][0]


def test_a_bad_image_fails_alone_and_content_is_sniffed_not_trusted(served):
    png_named_jpg = ("photo.jpg", served["bytes"]["good.png"], "text/plain")
    text_named_png = ("notes.png", b"this is not an image", "image/png")
    with client_for(served) as client:
        r = client.post("/v1/score", files=upload(served, "bad.png", raw=[png_named_jpg, text_named_png]))
    assert r.status_code == 200
    bad, photo, notes = r.json()["results"]
    assert bad["verdict"] == "anomaly" and photo["verdict"] == "normal"
    assert notes["verdict"] is None and notes["anomaly_score"] is None
    assert "notes.png" in notes["error"] and "not an image" in notes["error"]


def test_explain_sets_the_number_of_nearest_normals(served):
    with client_for(served) as client:
        none = client.post("/v1/score", files=upload(served, "good.png"), data={"explain": "0"}).json()
        five = client.post("/v1/score", files=upload(served, "good.png"), data={"explain": "5"}).json()
        too_many = client.post("/v1/score", files=upload(served, "good.png"), data={"explain": "21"})
        not_a_number = client.post("/v1/score", files=upload(served, "good.png"), data={"explain": "-1"})
    assert none["results"][0]["nearest"] == [] and len(five["results"][0]["nearest"]) == 5
    assert too_many.status_code == 422 and "0 to 20" in too_many.json()["detail"]
    assert not_a_number.status_code == 422


def test_several_models_are_listed_and_chosen_by_name(served):
    with client_for(served) as client:
        listed = client.get("/v1/models").json()
        plain = client.post("/v1/score", files=upload(served, "good.png"), data={"model": "plain"}).json()
        unknown = client.post("/v1/score", files=upload(served, "good.png"), data={"model": "nope"})
    assert [m["name"] for m in listed["models"]] == ["parts", "plain"]
    parts_info, plain_info = listed["models"]
    assert parts_info["thumbnails"] is True and plain_info["thumbnails"] is False
    assert (parts_info["k"], plain_info["k"], parts_info["training_size"], parts_info["maps"]) == (2, 1, 12, False)
    assert parts_info["backbone"] == "efficientnet_lite0" and parts_info["preset"] == "paper"
    assert listed["dn2_version"] == dn2.__version__
    assert plain["model"] == "plain" and plain["results"][0]["nearest"][0]["thumbnail"] is None
    assert unknown.status_code == 404 and "parts, plain" in unknown.json()["detail"]


def test_thumbnails_are_served_from_the_model_file_by_index_only(served):
    thumbs = served["fitted"].thumbnails_
    with client_for(served) as client:
        first = client.post("/v1/score", files=upload(served, "good.png")).json()["results"][0]["nearest"][0]
        url = first["thumbnail"]
        assert re.fullmatch(r"/v1/thumbnails/parts/\d+", url)
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        row = int(url.rsplit("/", 1)[1])
        assert r.content == thumbs[row] and served["fitted"].detector.memory_names_[row] == first["name"]
        assert client.get("/v1/thumbnails/parts/12").status_code == 404  # 12 memory images: 0..11
        assert client.get("/v1/thumbnails/plain/0").status_code == 404  # fitted without thumbnails
        assert client.get("/v1/thumbnails/parts/-1").status_code == 422
        assert client.get("/v1/thumbnails/parts/parts.dn2").status_code == 422  # an index, never a path
        assert client.get("/v1/thumbnails/parts/..%2F..%2Fparts.dn2").status_code in (404, 422)
        assert client.get("/v1/thumbnails/..%2Fparts/1").status_code in (404, 422)


def test_with_a_token_everything_but_health_and_the_page_needs_it(served):
    good = {"Authorization": f"Bearer {TOKEN}"}
    with client_for(served, token=TOKEN) as client:
        for method, url in [("get", "/v1/models"), ("get", "/metrics"), ("get", "/openapi.json"),
                            ("get", "/v1/thumbnails/parts/0")]:
            r = getattr(client, method)(url)
            assert r.status_code == 401, url
            assert r.headers["www-authenticate"] == "Bearer"
            assert getattr(client, method)(url, headers={"Authorization": "Bearer wrong-token-of-some-length"}).status_code == 401
            assert getattr(client, method)(url, headers=good).status_code == 200, url
        assert client.post("/v1/score", files=upload(served, "good.png")).status_code == 401
        assert client.post("/v1/score", files=upload(served, "good.png"), headers={"Authorization": TOKEN}).status_code == 401
        assert client.post("/v1/score", files=upload(served, "good.png"), headers=good).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/").status_code == 200 and client.get("/static/page.js").status_code == 200


def test_without_a_token_the_api_is_open(served):
    with client_for(served) as client:
        assert client.get("/v1/models").status_code == 200 and client.get("/metrics").status_code == 200


def test_request_limits_are_4xx_json_errors(served):
    with client_for(served, max_images=2, max_request_bytes=200_000, max_file_bytes=50_000) as client:
        r = client.post("/v1/score", files=upload(served, "good.png", "bad.png", "good.png"))
        assert r.status_code == 413 and "more than 2 images" in r.json()["detail"]

        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)  # ~120 KB of noise as PNG
        r = client.post("/v1/score", files=upload(served, "good.png", raw=[("noise.png", _png(Image.fromarray(big)), "image/png")]))
        good, noise = r.json()["results"]
        assert r.status_code == 200 and good["verdict"] == "normal" and "larger than 50000 bytes" in noise["error"]

        def chunks():  # a chunked body (no Content-Length) must be counted as it streams
            yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(40):
                yield b"x" * 10_000

        r = client.post("/v1/score", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "larger than 200000 bytes" in r.json()["detail"]
        r = client.post("/v1/score", content=b"x", headers={"Content-Type": "multipart/form-data; boundary=b",
                                                            "Content-Length": "999999999"})
        assert r.status_code == 413

        assert client.post("/v1/score", json={"files": []}).status_code == 415
        r = client.post("/v1/score", data={"explain": "1"}, files=[("other", ("a.png", b"x"))])
        assert r.status_code == 400 and "unknown field 'other'" in r.json()["detail"]
        r = client.post("/v1/score", content=b"--b\r\nContent-Disposition: form-data; name=\"explain\"\r\n\r\n1\r\n--b--\r\n",
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 400 and "no image" in r.json()["detail"]
        r = client.post("/v1/score", content=b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n\r\nab",
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 400 and "ends before" in r.json()["detail"]


def test_pixels_per_image_are_bounded_by_image_memory(served):
    huge = _png(Image.new("RGB", (2000, 1000), "white"))  # 8 MB decoded: over a 1 MiB budget
    with client_for(served) as client, config_context(image_memory=1):
        r = client.post("/v1/score", files=upload(served, "good.png", raw=[("huge.png", huge, "image/png")]))
    good, refused = r.json()["results"]
    assert r.status_code == 200 and good["verdict"] == "normal"
    assert "image_memory" in refused["error"] and "huge.png" in refused["error"]


def test_too_many_waiting_images_is_a_503(served):
    with client_for(served, max_pending_images=1) as client:
        r = client.post("/v1/score", files=upload(served, "good.png", "bad.png"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]


def test_metrics_count_requests_errors_latency_and_images(served):
    with client_for(served, token=TOKEN) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(2):
            client.post("/v1/score", files=upload(served, "good.png", raw=[("x.png", b"no", "image/png")]), headers=auth)
        client.get("/v1/models")  # 401
        client.get("/v1/thumbnails/parts/99", headers=auth)  # 404
        text = client.get("/metrics", headers=auth).text
    assert 'dn2_requests_total{endpoint="/v1/score",status="200"} 2' in text
    assert 'dn2_requests_total{endpoint="/v1/models",status="401"} 1' in text
    assert 'dn2_requests_total{endpoint="/v1/thumbnails/{model}/{index}",status="404"} 1' in text
    assert 'dn2_errors_total{kind="rejected"} 2' in text and 'dn2_errors_total{kind="bad_image"} 2' in text
    assert 'dn2_images_scored_total{model="parts"} 2' in text and 'dn2_images_refused_total{model="parts"} 2' in text
    assert 'dn2_request_duration_seconds_count{endpoint="/v1/score"} 2' in text
    assert 'dn2_request_duration_seconds_bucket{endpoint="/v1/score",le="+Inf"} 2' in text
    assert 'dn2_batch_images_count{model="parts"} 2' in text
    # every sample line is "name{labels} value" (Prometheus text format)
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r'[a-z_][a-z0-9_]*(\{[a-z]+="[^"]*"(,[a-z]+="[^"]*")*\})? [0-9.e+-]+', s) for s in samples)


def test_concurrent_requests_share_one_network_run(served):
    parts = served["models"]["parts"]
    runs = []
    batcher = MicroBatcher({"parts": parts}, batch_wait_ms=500, on_batch=lambda m, n, s: runs.append(n))
    batcher.start()
    try:
        images = [served["images"]["good.png"], served["images"]["bad.png"], served["images"]["good.png"]]
        futures = [batcher.submit("parts", [im], explain=2) for im in images]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    assert runs == [3]  # one forward pass for the three requests
    expected = served["fitted"].anomaly_score(images)
    np.testing.assert_allclose([r.verdicts.scores[0] for r in results], expected, rtol=1e-5)
    assert [r.verdicts.rows.shape for r in results] == [(1, 2)] * 3


def test_the_page_and_its_files_are_served_with_a_strict_policy(served):
    with client_for(served) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert '<label for="token">' in page.text and 'type="file"' in page.text
        assert client.get("/static/dn2.css").headers["content-type"].startswith("text/css")
        assert client.get("/static/index.html").status_code == 404
        assert client.get("/static/app.py").status_code == 404
        assert client.get("/static/..%2F__init__.py").status_code == 404


def test_openapi_documents_the_endpoints_with_models_and_examples(served):
    with client_for(served) as client:
        schema = client.get("/openapi.json").json()
    score = schema["paths"]["/v1/score"]["post"]
    body = score["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["files"] and body["properties"]["files"]["type"] == "array"
    assert score["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ScoreResponse")
    assert {"413", "401", "415"} <= set(score["responses"])
    result = schema["components"]["schemas"]["ImageResult"]
    assert result["properties"]["anomaly_score"]["description"] and result["properties"]["name"]["examples"]
    assert schema["components"]["schemas"]["ScoreResponse"]["examples"]
    assert set(schema["paths"]) >= {"/v1/models", "/v1/thumbnails/{model}/{index}", "/healthz", "/metrics"}


def test_settings_refuse_weak_tokens_and_open_addresses_without_one():
    with pytest.raises(ValueError, match="token"):
        ServeSettings(token="short")
    assert "correct" not in repr(ServeSettings(token=TOKEN))
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        check_listen(host, token=None, insecure=False)
    for host in ("0.0.0.0", "192.0.2.1", "::", "example.org"):
        with pytest.raises(ValueError, match="without a token"):
            check_listen(host, token=None, insecure=False)
        check_listen(host, token=TOKEN, insecure=False)
        check_listen(host, token=None, insecure=True)


def test_cli_refuses_an_open_address_before_loading_anything(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.dn2"), "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", str(tmp_path / "missing.dn2"), "--token-file", str(tmp_path / "empty")]) == 2
    assert "token file is empty" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.dn2")]) == 2
    assert "missing.dn2" in capsys.readouterr().err


def test_cli_says_how_to_install_the_serve_extra(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "dn2.serve" or m.startswith("dn2.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    assert main(["serve", "m.dn2"]) == 2
    assert 'pip install "dn2[serve]"' in capsys.readouterr().err


def test_model_names_are_identifiers(served):
    root = served["root"]
    with pytest.raises(ValueError, match="already loaded"):
        load_models([str(root / "parts.dn2"), f"parts={root / 'plain.dn2'}"])
    named = load_models([f"line-3={root / 'plain.dn2'}"])
    assert list(named) == ["line-3"]
    with pytest.raises(ValueError, match="model name"):
        load_models(["bad name=" + str(root / "plain.dn2")])


def test_requests_from_many_threads_are_all_answered(served):
    with client_for(served, batch_wait_ms=20) as client:
        answers: list[int] = []

        def call() -> None:
            answers.append(client.post("/v1/score", files=upload(served, "good.png")).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == [200] * 6
