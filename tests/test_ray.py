"""DN2 on Ray (issue 15): one local Ray session (2 CPUs) for the module, a few hundred small generated images.

The distributed results must be the single-machine ones: embeddings to fp32 tolerance (same runtime,
precision fp32), leave-one-out training scores, threshold and query scores exactly. A worker killed
in the middle of a shard loses and duplicates no row; a rerun writes nothing new.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra")
pytest.importorskip("pyarrow", reason="needs the ray extra")

import pyarrow.parquet as pq  # noqa: E402

import dn2  # noqa: E402
import dn2.ray  # noqa: E402
from dn2 import KNNDetector  # noqa: E402
from dn2.cli import main  # noqa: E402
from dn2.images import as_source  # noqa: E402
from dn2.ray.embed import META_NAME, read_shard  # noqa: E402

from conftest import make_image  # noqa: E402

N_IMAGES = 200
SHARD_ROWS = 25
FAULTS = "DN2_TEST_RAY_FAULTS"  # folder of the kill switch, seen by the Ray workers (inherited environment)


def _kill_once_in_a_shard() -> None:
    """Ray worker setup hook: while ``armed`` exists, the first embedder to reach shard 3 dies (SIGKILL)
    after embedding it and before writing it, leaving ``killed`` behind. Pickled by value: workers
    cannot import this test module."""
    import os
    import signal
    from pathlib import Path

    from dn2.ray import embed

    original = embed.ShardEmbedder.embed_shard

    def embed_shard(self, i):
        folder = Path(os.environ["DN2_TEST_RAY_FAULTS"])
        if i == 3 and (folder / "armed").exists() and not (folder / "killed").exists():
            (folder / "killed").touch()
            self.embedder.embed(embed.SubsetSource(self.source, list(range(i * self.shard_rows, (i + 1) * self.shard_rows))))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, i)

    embed.ShardEmbedder.embed_shard = embed_shard


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (start-up takes seconds on 2 busy cores), shut down afterwards."""
    faults = Path(tempfile.mkdtemp(prefix="dn2-faults-"))
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS, str(faults))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    temp = tempfile.mkdtemp(prefix="dn2ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _kill_once_in_a_shard})
    yield faults
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """N_IMAGES small stripe images and two bad files, in one folder."""
    folder = tmp_path_factory.mktemp("ray-images")
    for i in range(N_IMAGES):
        make_image("stripes", i, size=32).save(folder / f"img{i:03d}.png")
    (folder / "img050_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "img150_text.jpg").write_text("not a picture")
    return folder


@pytest.fixture(scope="module")
def method():
    return dn2.ray.method_of(dn2.DN2(preset="paper", normalize="sqrt_l2", precision="fp32", runtime="openvino"))


@pytest.fixture(scope="module")
def embedded(ray_cluster, images, method, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-emb") / "emb"
    run = dn2.ray.embed_to_parquet(images, folder, method, runtime="openvino", workers=2, shard_rows=SHARD_ROWS,
                                   progress=False)
    return run


@pytest.fixture(scope="module")
def reference(images, method):
    """The single-process embeddings of the same images (skip_bad, as the pipeline records them)."""
    return dn2.ray.method_embedder(method, runtime="openvino").embed(images)


def test_embeddings_equal_the_single_process_ones(embedded, reference):
    emb = dn2.ray.read_embeddings(embedded.folder)
    assert embedded.n_images == N_IMAGES + 2 and embedded.bad == 2 and embedded.n_shards == 9
    assert emb.names == reference.names and emb.skipped == reference.skipped
    np.testing.assert_allclose(emb.vectors, reference.vectors, rtol=1e-5, atol=1e-6)
    rows = pq.read_table(embedded.folder / "part-000002-of-000009.parquet").to_pylist()
    bad = [r for r in rows if r["error"] is not None]
    assert [r["name"] for r in bad] == ["img050_broken.png"] and bad[0]["embedding"] is None
    assert "img050_broken.png" in bad[0]["error"]


def test_a_rerun_writes_no_new_shard(embedded, images, method):
    files = {p.name: p.stat().st_mtime_ns for p in embedded.folder.iterdir()}
    again = dn2.ray.embed_to_parquet(images, embedded.folder, method, runtime="openvino", workers=2,
                                     shard_rows=SHARD_ROWS, progress=False)
    assert again.written == 0 and again.n_shards == embedded.n_shards
    assert again.busy_seconds == 0 < embedded.busy_seconds
    assert {p.name: p.stat().st_mtime_ns for p in embedded.folder.iterdir()} == files


def test_a_missing_shard_is_embedded_again_and_other_inputs_are_refused(embedded, images, method, tmp_path):
    folder = tmp_path / "emb"
    shutil.copytree(embedded.folder, folder)
    (folder / "part-000004-of-000009.parquet").unlink()
    with pytest.raises(ValueError, match="1 of 9 shards missing"):
        dn2.ray.read_embeddings(folder)
    run = dn2.ray.embed_to_parquet(images, folder, method, runtime="openvino", workers=1, shard_rows=SHARD_ROWS,
                                   progress=False)
    assert run.written == 1
    np.testing.assert_array_equal(dn2.ray.read_embeddings(folder).vectors,
                                  dn2.ray.read_embeddings(embedded.folder).vectors)
    with pytest.raises(ValueError, match="other inputs or another model .*shard_rows"):
        dn2.ray.embed_to_parquet(images, folder, method, runtime="openvino", shard_rows=50, progress=False)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(ValueError, match="holds other files"):
        dn2.ray.embed_to_parquet(images, tmp_path / "photos", method, runtime="openvino", progress=False)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"mine"


def test_a_killed_worker_loses_and_duplicates_no_row(ray_cluster, embedded, images, method, tmp_path):
    (ray_cluster / "armed").touch()
    try:
        run = dn2.ray.embed_to_parquet(images, tmp_path / "emb", method, runtime="openvino", workers=2,
                                       shard_rows=SHARD_ROWS, progress=False)
    finally:
        (ray_cluster / "armed").unlink()
    assert (ray_cluster / "killed").exists(), "the fault was not injected"
    index = np.concatenate([read_shard(p)[1] for p in dn2.ray.shard_files(run.folder)])
    errors = sum(pq.read_table(p).column("error").null_count for p in dn2.ray.shard_files(run.folder))
    assert errors == N_IMAGES and len(index) == N_IMAGES and len(np.unique(index)) == N_IMAGES
    rows = [pq.read_table(p).column("index").to_pylist() for p in dn2.ray.shard_files(run.folder)]
    assert sum(rows, []) == list(range(N_IMAGES + 2))
    np.testing.assert_array_equal(dn2.ray.read_embeddings(run.folder).vectors,
                                  dn2.ray.read_embeddings(embedded.folder).vectors)
    assert sorted(p.name for p in run.folder.iterdir() if not p.name.startswith("part-")) == [META_NAME]


@pytest.mark.parametrize("params", [dict(k=2, normalize="sqrt_l2"), dict(k=3, clean=0.2, contamination=0.1)])
def test_sharded_search_equals_the_single_machine_detector(embedded, params):
    emb = dn2.ray.read_embeddings(embedded.folder)
    queries = np.abs(np.random.default_rng(1).normal(size=(40, emb.vectors.shape[1]))).astype(np.float32) * 0.05
    queries[:10] = emb.vectors[:10] + 1e-3
    local = KNNDetector(**params).fit(emb.vectors, names=emb.names)
    sharded = dn2.ray.ShardedKNNDetector(**params, n_shards=2, query_rows=37).fit(embedded.folder)
    try:
        np.testing.assert_array_equal(sharded.train_scores_, local.train_scores_)
        np.testing.assert_array_equal(sharded.kept_, local.kept_)
        assert sharded.threshold_ == local.threshold_
        np.testing.assert_array_equal(sharded.anomaly_score(queries), local.anomaly_score(queries))
        np.testing.assert_array_equal(sharded.predict(queries), local.predict(queries))
        assert sharded.nearest(queries[:3], 2) == local.nearest(queries[:3], 2)
        gathered = sharded.to_detector()
        np.testing.assert_array_equal(gathered.memory_, local.memory_)
        assert gathered.memory_names_ == local.memory_names_ and gathered.get_params() == local.get_params()
    finally:
        sharded.shutdown()


def test_sharded_fit_on_an_array_and_its_manifest(tmp_path, ray_cluster):
    X = np.abs(np.random.default_rng(0).normal(size=(300, 24))).astype(np.float32)
    X[7] = X[8]  # an exact duplicate: leave-one-out must still find it
    local = KNNDetector(k=2, normalize="whiten").fit(X)
    sharded = dn2.ray.ShardedKNNDetector(k=2, normalize="whiten", n_shards=2, query_rows=64).fit(X)
    try:
        path = sharded.save_manifest(tmp_path / "bank.json")
        with pytest.raises(FileExistsError):
            sharded.save_manifest(path)
    finally:
        sharded.shutdown()
    manifest = json.loads(path.read_text())
    shard_files = [tmp_path / s["file"] for s in manifest["shards"]]
    assert [isinstance(dn2.load(f), KNNDetector) for f in shard_files] == [True, True]
    loaded, model = dn2.ray.load_manifest(path)
    try:
        assert model is None and loaded.threshold_ == local.threshold_
        np.testing.assert_array_equal(loaded.train_scores_, local.train_scores_)
        np.testing.assert_array_equal(loaded.anomaly_score(X[:20] + 0.01), local.anomaly_score(X[:20] + 0.01))
    finally:
        loaded.shutdown()
    data = bytearray(shard_files[1].read_bytes())
    data[-5] ^= 1
    shard_files[1].write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        dn2.ray.load_manifest(path)


def test_fit_and_score_commands_on_a_local_ray(ray_cluster, image_folders, tmp_path, capsys):
    normal, test = str(image_folders["normal"]), str(image_folders["test"])
    options = ["--preset", "paper", "--precision", "fp32", "--runtime", "openvino", "--quiet"]
    local = dn2.DN2(preset="paper", precision="fp32", runtime="openvino", progress=False).fit(normal)
    assert main(["fit", normal, "-o", str(tmp_path / "m.dn2"), *options, "--ray-embeddings", str(tmp_path / "emb"),
                 "--ray", "--ray-workers", "2"]) == 0
    assert "2 shards" in capsys.readouterr().out
    fitted = dn2.load(tmp_path / "m.dn2")
    assert fitted.threshold_ == pytest.approx(local.threshold_, rel=1e-5) and fitted.method_ == local.method_
    np.testing.assert_allclose(fitted.detector.train_scores_, local.detector.train_scores_, rtol=1e-5)

    assert main(["fit", normal, "-o", str(tmp_path / "m.json"), *options, "--ray-manifest", "--ray-shards", "2",
                 "--ray-embeddings", str(tmp_path / "emb"), "--ray"]) == 0  # resumes: nothing to embed
    capsys.readouterr()
    for model, out in (("m.dn2", "a.csv"), ("m.json", "b.csv")):  # the second run reuses the test embeddings
        assert main(["score", str(tmp_path / model), test, "--csv", str(tmp_path / out), "--explain", "1", "--quiet",
                     "--ray-embeddings", str(tmp_path / "test-emb"), "--ray"]) == 0
    a, b = (list(csv.DictReader(open(tmp_path / f))) for f in ("a.csv", "b.csv"))
    assert a == b and len(a) == 6
    expected = local.anomaly_score([Path(test) / r["image"] for r in a])
    np.testing.assert_allclose([float(r["anomaly_score"]) for r in a], expected, atol=2e-6)
    assert {r["verdict"] for r in a if r["image"].startswith("bad")} == {"anomaly"}

    assert main(["fit", normal, "-o", str(tmp_path / "x.dn2"), *options, "--ray-manifest", "--ray"]) == 2
    assert "named *.json" in capsys.readouterr().err


def test_dn2_works_without_ray_and_says_how_to_install_it(tmp_path):
    script = (
        "import sys; sys.modules['ray'] = None\n"  # as if the extra were not installed
        "import dn2, dn2.cli\n"
        "from dn2.cli import main\n"
        f"code = main(['fit', {str(tmp_path)!r}, '-o', {str(tmp_path / 'm.dn2')!r}, '--ray'])\n"
        "sys.exit(10 + code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 12, done.stderr
    assert 'pip install "dn2[ray]"' in done.stderr


@pytest.mark.parametrize("options, refused", [
    (["--precision", "int8"], "does not run precision int8"),
    (["--maps", "spade"], "image-level scores only"),
    (["--thumbnails"], "--thumbnails"),
])
def test_what_ray_does_not_run_is_refused_before_ray_starts(image_folders, tmp_path, capsys, options, refused):
    out = tmp_path / "m.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(out), "--quiet", *options, "--ray"]) == 2
    assert refused in capsys.readouterr().err and not out.exists()


def test_manifests_of_image_paths(tmp_path, images):
    paths = sorted(str(p) for p in images.iterdir())[:3]
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(paths) + "\nmissing.png\n")
    source = dn2.ray.image_source(str(tmp_path / "list.csv"))
    assert source.names()[:3] == paths and len(source) == 4
    assert source.load(0).size == as_source(paths[0]).load(0).size
    with pytest.raises(dn2.BadImageError, match="missing.png"):
        source.load(3)
    import pyarrow as pa

    pq.write_table(pa.table({"path": ["a.png"], "label": [1]}), tmp_path / "list.parquet")
    assert dn2.ray.image_source(str(tmp_path / "list.parquet")).names() == [str(tmp_path / "a.png")]
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="'path' column"):
        dn2.ray.image_source(str(tmp_path / "other.parquet"))

