"""int8: the network quantised on the fit images, what it computes, and that it travels with the model.

One EfficientNet-Lite0 quantisation on 12 generated images is shared by the module (NNCF takes some
seconds); the cache tests quantise a two-convolution network instead.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import dn2
from dn2 import runtime
from dn2.backbones import Backbone
from dn2.cli import main
from dn2.features import calibrate, extract
from dn2.modelfile import ModelFileError, read_header, read_model, write_model
from dn2.runtime import Calibration, cpu, int8
from dn2.runtime.cpu import CpuFeatures
from dn2.settings import PRESETS

from conftest import make_image  # noqa: E402 - the tests folder's helpers

pytestmark = [
    pytest.mark.skipif(not (runtime.openvino_available() and int8.nncf_available()), reason="needs openvino and nncf"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NORMAL = np.stack([np.asarray(make_image("stripes", i)) for i in range(12)])  # image_folders' normal/ images
TEST = np.stack([np.asarray(make_image(kind, seed)) for kind, seed in
                 [("stripes", 100), ("stripes", 101), ("blob", 200), ("blob", 201)]])


@pytest.fixture(scope="module")
def lite0_int8(lite0):
    """Lite0 quantised on the 12 normal images (the same crops a DN2 fitted on image_folders' normal/ uses)."""
    calibration = calibrate(lite0, NORMAL)
    return calibration, runtime.quantize_int8(lite0, calibration)


def tiny_backbone(lite0: Backbone) -> Backbone:
    """Two convolutions (224 -> 56 -> 28 px): one early layer kept float, one quantised; quantised in a second."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(body, nn.Identity(), replace(lite0.config, name="tiny_int8", feature_dim=16), "test:tiny").eval()


def _embed(net, images, precision, **kw):
    return extract(net, images, runtime="openvino", precision=precision, progress=False, num_workers=0, **kw).vectors


# ----------------------------------------------------------------------------- what the int8 network computes


def test_int8_embeddings_are_close_to_fp32(lite0, lite0_int8):
    _, network = lite0_int8
    got, ref = _embed(lite0, TEST, "int8", network=network), _embed(lite0, TEST, "fp32")
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    cosine = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 0.2 and cosine.min() > 0.98, (rel, cosine)  # measured here: ~0.08-0.10, > 0.994
    assert not np.array_equal(got, ref)  # it is int8: not the fp32 network under another name


def test_early_layers_and_depthwise_convolutions_stay_float(lite0, lite0_int8):
    """The recipe, read from the quantised graph: a convolution runs in int8 iff a FakeQuantize feeds it."""
    import openvino as ov

    _, network = lite0_int8
    model = ov.Core().read_model(model=network.xml, weights=network.weights)
    crop = lite0.config.preprocessing.crop
    kinds = Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            size = op.get_output_partial_shape(0)[2].get_length()
            quantised = op.input(0).get_source_output().get_node().get_type_name() == "FakeQuantize"
            kinds[(op.get_type_name(), "early" if size >= crop // 4 else "late", quantised)] += 1
    assert kinds[("Convolution", "late", True)] >= 20  # the 1x1 convolutions of stages 2-6
    assert {key for key in kinds if key[2]} == {("Convolution", "late", True)}  # nothing else is quantised
    assert kinds[("GroupConvolution", "late", False)] > 0 and kinds[("Convolution", "early", False)] > 0


def test_the_calibration_sample_is_deterministic_and_bounded():
    assert [int8.calibration_size(n) for n in (1, 99, 100, 1000, 2500, 10**6)] == [1, 99, 100, 100, 250, 300]
    assert int8.calibration_indices(1000).tolist() == np.linspace(0, 999, 100).round().astype(int).tolist()
    assert int8.calibration_indices(5).tolist() == [0, 1, 2, 3, 4]
    crops = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    changed = crops.copy()
    changed[2, 1, 4, 4] ^= 1
    assert Calibration.from_crops(crops).digest == Calibration.from_crops(crops.copy()).digest
    assert Calibration.from_crops(crops).digest != Calibration.from_crops(changed).digest  # one bit of one pixel
    with pytest.raises(ValueError, match="uint8"):
        Calibration.from_crops(crops.astype(np.float32))


# ----------------------------------------------------------------------------- cache and identity


def test_the_cache_key_changes_with_the_calibration_sample(lite0, monkeypatch, tmp_path):
    tiny = tiny_backbone(lite0)
    crops = np.random.default_rng(1).integers(0, 256, (20, 3, 224, 224), dtype=np.uint8)
    first = runtime.quantize_int8(tiny, Calibration.from_crops(crops))

    def no_nncf(*args):
        raise AssertionError("quantised again")

    quantize_model = int8.quantize_model
    monkeypatch.setattr(int8, "quantize_model", no_nncf)
    again = runtime.quantize_int8(tiny, Calibration.from_crops(crops.copy()))  # same images: a cache hit
    assert again.sha256 == first.sha256 and again.record() == first.record()
    other = crops.copy()
    other[7, 0, 100, 100] ^= 1
    with pytest.raises(AssertionError, match="quantised again"):  # one changed pixel: another network
        runtime.quantize_int8(tiny, Calibration.from_crops(other))
    a, b = Calibration.from_crops(crops), Calibration.from_crops(other)
    assert runtime.OpenVinoRunner.cache_key(tiny, "int8", calibration=a) != runtime.OpenVinoRunner.cache_key(
        tiny, "int8", calibration=b)
    monkeypatch.setattr(int8, "quantize_model", quantize_model)
    monkeypatch.setenv("DN2_CACHE", str(tmp_path))  # an empty cache: converted and quantised again
    remade = runtime.quantize_int8(tiny, Calibration.from_crops(crops))
    assert remade.weights == first.weights  # the same weights and ranges; the .xml differs in generated op names
    np.testing.assert_array_equal(_embed(tiny, TEST, "int8", network=remade), _embed(tiny, TEST, "int8", network=first))


def test_get_runner_needs_calibration_or_network_for_int8_only(lite0, lite0_int8):
    calibration, network = lite0_int8
    with pytest.raises(ValueError, match="needs either calibration images or a quantised network"):
        runtime.get_runner(lite0, "openvino", "int8")
    with pytest.raises(ValueError, match="needs either"):
        runtime.get_runner(lite0, "openvino", "int8", calibration=calibration, network=network)
    with pytest.raises(ValueError, match="apply to precision='int8' only"):
        runtime.get_runner(lite0, "openvino", "fp32", network=network)
    runner = runtime.get_runner(lite0, "auto", "int8", network=network)
    assert (runner.name, runner.precision, runner.network) == ("openvino", "int8", network)
    assert runtime.get_runner(lite0, "openvino", "int8", network=network) is runner


def test_int8_on_another_runtime_is_an_error_before_any_work(image_folders, monkeypatch):
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded")

    monkeypatch.setattr(dn2.features, "extract", no_embedding)
    for name in ("torch", "onnx"):
        with pytest.raises(ValueError, match=f"runtime='{name}' runs .*fp32 only, got precision='int8'"):
            dn2.DN2(precision="int8", runtime=name, progress=False).fit(image_folders["normal"])
    monkeypatch.setattr(runtime.openvino_runner, "openvino_available", lambda: False)
    with pytest.raises(ValueError, match="no installed runtime runs precision='int8'"):
        dn2.DN2(precision="int8", progress=False).fit(image_folders["normal"])


def test_auto_never_picks_int8(monkeypatch):
    from dn2.backbones import REGISTRY

    monkeypatch.setattr(cpu, "cpu_features", lambda: CpuFeatures(**{name: True for name in CpuFeatures.names()}))
    assert runtime.PRECISION_TABLE["int8"].is_native(cpu.cpu_features())  # native with VNNI, and still not chosen
    for preset in PRESETS.values():
        for backbone in [preset.backbone, *REGISTRY]:
            model = dn2.DN2(preset="paper", backbone=backbone, normalize=preset.normalize)
            for name in runtime.RUNTIMES:
                assert runtime.resolve_precision(model.method().extraction_precision(), name) != "int8"


def test_without_nncf_int8_fitting_says_how_to_install_and_scoring_still_works(image_folders, tmp_path, monkeypatch,
                                                                                lite0_int8):
    model = dn2.DN2(preset="paper", precision="int8", progress=False).fit(image_folders["normal"])
    path = model.save(tmp_path / "m.dn2")
    monkeypatch.setattr(int8, "nncf_available", lambda: False)
    with pytest.raises(int8.NNCFMissingError, match=r"pip install 'dn2\[int8\]'"):
        dn2.DN2(preset="paper", precision="int8", progress=False).fit(image_folders["normal"])
    scores = dn2.load(path, progress=False).anomaly_score(image_folders["test"])  # OpenVINO alone runs the stored network
    np.testing.assert_array_equal(scores, model.anomaly_score(image_folders["test"]))


# ----------------------------------------------------------------------------- the network travels with the model


def test_an_int8_model_scores_with_its_own_network_after_load_with_an_empty_cache(image_folders, tmp_path, monkeypatch,
                                                                                   lite0_int8):
    _, network = lite0_int8
    model = dn2.DN2(preset="paper", precision="int8", progress=False).fit(image_folders["normal"])
    assert model.method_.precision == "int8"
    assert model.embedder_.int8_networks_[0].sha256 == network.sha256  # the same crops: the cached network
    test = image_folders["test"]
    before = model.anomaly_score(test)
    path = model.save(tmp_path / "int8.dn2")
    header = read_header(path)
    assert header["method"]["precision"] == "int8"
    assert header["backbone"]["int8"]["sha256"] == network.sha256
    assert header["backbone"]["int8"]["calibration"] == {"images": 12, "sha256": lite0_int8[0].digest}

    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("DN2_CACHE", str(empty))  # another machine: no fp32 export, no int8 network
    runtime.clear_runner_cache()
    monkeypatch.setattr(int8, "quantize_model", lambda *a: pytest.fail("re-quantised instead of the stored network"))
    loaded = dn2.load(path, progress=False)
    np.testing.assert_array_equal(loaded.anomaly_score(test), before)
    assert (empty / "openvino-int8" / f"sha256-{network.sha256[:32]}.xml").is_file()  # installed by its digest
    assert loaded.embedder.identity() == model.embedder.identity()
    with pytest.warns(UserWarning, match="made in int8; scoring in fp32"):  # asked for: allowed, and warned about
        assert not np.array_equal(loaded.set_params(precision="fp32").anomaly_score(test), before)
    again = dn2.load(loaded.save(tmp_path / "again.dn2"), progress=False)  # saved after scoring in fp32
    np.testing.assert_array_equal(again.anomaly_score(test), before)


@pytest.fixture
def int8_model_file(image_folders, tmp_path, lite0_int8):
    return dn2.DN2(preset="paper", precision="int8", progress=False).fit(image_folders["normal"]).save(tmp_path / "m.dn2")


def test_a_damaged_embedded_network_is_refused(int8_model_file, tmp_path):
    data = bytearray(int8_model_file.read_bytes())
    data[-200] ^= 0xFF  # in the tensor data at the end of the file
    damaged = tmp_path / "damaged.dn2"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum mismatch in tensor"):
        dn2.load(damaged)


def _rewritten(path, tmp_path, change):
    """A consistent file (all digests recomputed, as a foreign writer could make it) with a change."""
    header, tensors = read_model(path)
    header = copy.deepcopy(header)
    change(header, tensors)
    return write_model(tmp_path / "rewritten.dn2", header, tensors, force=True)


def test_a_replaced_embedded_network_is_refused(int8_model_file, tmp_path, lite0):
    def flip_a_weight(header, tensors):
        weights = tensors["int8/0/bin"].copy()
        weights[len(weights) // 2] ^= 1
        tensors["int8/0/bin"] = weights

    with pytest.raises(ModelFileError, match="does not match its recorded sha256"):
        dn2.load(_rewritten(int8_model_file, tmp_path, flip_a_weight))

    tiny = runtime.quantize_int8(tiny_backbone(lite0), Calibration.from_crops(np.zeros((2, 3, 224, 224), np.uint8)))

    def another_network(header, tensors):  # consistent: the record names the new network's digest
        tensors.update(tiny.tensors("int8/0/"))
        header["backbone"]["int8"]["sha256"] = tiny.sha256

    with pytest.raises(ModelFileError, match="does not fit backbone efficientnet_lite0"):
        dn2.load(_rewritten(int8_model_file, tmp_path, another_network))

    def drop_it(header, tensors):
        del tensors["int8/0/xml"]

    with pytest.raises(ModelFileError, match="int8/0/xml"):
        dn2.load(_rewritten(int8_model_file, tmp_path, drop_it))


def test_precision_int8_from_the_command_line(image_folders, tmp_path, capsys, lite0_int8):
    model = tmp_path / "int8.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(model), "--preset", "paper", "--precision", "int8",
                 "--quiet"]) == 0
    assert "fitted on 12 of 12 images" in capsys.readouterr().out  # NNCF's own output kept off the console
    assert read_header(model)["method"]["precision"] == "int8"
    assert main(["score", str(model), str(image_folders["test"]), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = {line.split()[0]: line.split()[2] for line in lines[1:-1]}
    assert {verdicts[f"bad/b{i}.jpg"] for i in range(3)} == {"anomaly"}

    assert main(["fit", str(image_folders["normal"]), "-o", str(tmp_path / "t.dn2"), "--precision", "int8",
                 "--runtime", "torch", "--quiet"]) == 2
    assert "runtime='torch' runs bf16, fp32 only, got precision='int8'" in capsys.readouterr().err
    assert not (tmp_path / "t.dn2").exists()

    fp32_model = tmp_path / "fp32.dn2"
    assert main(["fit", str(image_folders["normal"]), "-o", str(fp32_model), "--preset", "paper", "--quiet"]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="made in fp32; scoring in int8"):
        assert main(["score", str(fp32_model), str(image_folders["test"]), "--precision", "int8", "--quiet"]) == 2
    assert "has no int8 network" in capsys.readouterr().err  # int8 scoring needs the fit's own network

    assert main(["info"]) == 0
    info = capsys.readouterr().out
    assert "int8" in info and "openvino" in info and "never int8" in info


def test_bench_embeds_both_splits_with_one_network_calibrated_on_the_training_split(lite0, lite0_int8, tmp_path):
    from dn2.bench import embed_dataset
    from dn2.datasets import LabelledDataset, Split
    from dn2.images import as_source

    labels = np.zeros(len(NORMAL), dtype=np.int64)
    ds = LabelledDataset("toy", ["stripes"], Split(as_source(NORMAL), labels), Split(as_source(TEST), np.zeros(4, np.int64)))
    data = embed_dataset(ds, "efficientnet_lite0", cache_dir=tmp_path, precision="int8", progress=False, num_workers=0,
                         echo=lambda message: None)
    np.testing.assert_array_equal(data.x_test, _embed(lite0, TEST, "int8", network=lite0_int8[1]))
    fp32 = embed_dataset(ds, "efficientnet_lite0", cache_dir=tmp_path, precision="fp32", progress=False,
                         num_workers=0, echo=lambda message: None)
    assert not np.array_equal(fp32.x_test, data.x_test)  # separate cache entries



def test_nncf_is_imported_only_to_quantise():
    import subprocess
    import sys

    code = "import sys, dn2, dn2.cli, dn2.runtime; print('nncf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_an_int8_model_with_maps_quantises_the_image_network_and_keeps_the_maps_in_fp32(image_folders, tmp_path,
                                                                                           lite0_int8):
    model = dn2.DN2(preset="paper", precision="int8", maps="patchcore", map_backbone="efficientnet_lite0", map_size=96,
                    progress=False).fit(image_folders["normal"])
    test = image_folders["test"]
    maps = model.anomaly_map(test)
    loaded = dn2.load(model.save(tmp_path / "int8-maps.dn2"), progress=False)
    for ours, theirs in zip(maps, loaded.anomaly_map(test)):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    fp32 = dn2.DN2(preset="paper", precision="fp32", maps="patchcore", map_backbone="efficientnet_lite0", map_size=96,
                   progress=False).fit(image_folders["normal"])
    assert loaded.pixel_threshold_ == pytest.approx(fp32.pixel_threshold_, rel=1e-4)  # the maps' network is fp32's


def test_an_int8_ensemble_keeps_one_network_per_backbone_and_refuses_them_swapped(image_folders, tmp_path):
    model = dn2.DN2(preset="best", precision="int8", progress=False).fit(image_folders["normal"])
    test = image_folders["test"]
    path = model.save(tmp_path / "best-int8.dn2")
    parts = read_header(path)["backbone"]["parts"]
    assert [p["int8"]["backbone"] for p in parts] == ["efficientnet_lite0", "efficientnet_lite2"]
    np.testing.assert_array_equal(dn2.load(path, progress=False).anomaly_score(test), model.anomaly_score(test))

    def swap(header, tensors):
        for suffix in ("xml", "bin"):
            tensors[f"int8/0/{suffix}"], tensors[f"int8/1/{suffix}"] = tensors[f"int8/1/{suffix}"], tensors[f"int8/0/{suffix}"]
        first, second = header["backbone"]["parts"]
        first["int8"], second["int8"] = second["int8"], first["int8"]

    with pytest.raises(ModelFileError, match="does not fit backbone efficientnet_lite0"):
        dn2.load(_rewritten(path, tmp_path, swap))


def test_an_int8_model_scores_where_the_cache_cannot_be_written(int8_model_file, image_folders, monkeypatch):
    before = dn2.load(int8_model_file, progress=False).anomaly_score(image_folders["test"])
    runtime.clear_runner_cache()

    def read_only(network, cache_dir=None):
        raise PermissionError(13, "Permission denied", "/read-only/openvino-int8")

    monkeypatch.setattr(int8, "install", read_only)
    np.testing.assert_array_equal(dn2.load(int8_model_file, progress=False).anomaly_score(image_folders["test"]), before)
