"""Runtimes behind one interface: choosing a runtime and a precision, getting (cached) runners, falling
back to PyTorch, the same embeddings from every runtime, and the caller's backbone left alone."""

from __future__ import annotations

import gc
import inspect
import logging
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dn2 import runtime
from dn2.backbones import Backbone
from dn2.features import extract, normalize
from dn2.runtime import cpu, onnx_runner, openvino_runner
from dn2.runtime.base import PRECISION_TABLE, Precision, Runner
from dn2.runtime.cpu import CpuFeatures, parse_cpuinfo

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_onnx = pytest.mark.skipif(not runtime.onnx_available(), reason="needs onnx and onnxruntime")
needs_openvino = pytest.mark.skipif(not runtime.openvino_available(), reason="needs openvino")
AVX2_ONLY = CpuFeatures(avx2=True)
BF16_CPU = CpuFeatures(avx2=True, avx512f=True, avx512_bf16=True)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)


def tiny_backbone(lite0: Backbone, name: str) -> Backbone:
    """A one-convolution Backbone with its own identity: cheap to build runners for."""
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(body, nn.Identity(), replace(lite0.config, name=name, feature_dim=8), f"test:{name}").eval()


def embed(backbone, images, runtime_name, precision="fp32", **kw) -> np.ndarray:
    return extract(backbone, images, runtime=runtime_name, precision=precision, progress=False, num_workers=0,
                   **kw).vectors


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=1).max() / np.linalg.norm(b, axis=1).min())


# ----------------------------------------------------------------------------- choosing runtime and precision


def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda: AVX2_ONLY)
    assert runtime.resolve_precision("auto") == "fp32"  # bf16 would be emulated: many times slower
    assert not runtime.cpu_supports_bf16()
    monkeypatch.setattr(cpu, "cpu_features", lambda: BF16_CPU)
    assert runtime.resolve_precision("auto") == "bf16"
    assert runtime.resolve_precision("auto", "torch") == "bf16"
    assert runtime.resolve_precision("auto", "onnx") == "fp32"  # auto never picks what a runtime can't run
    assert runtime.resolve_precision("fp32") == "fp32" and runtime.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be"):
        runtime.resolve_precision("fp16")


def test_auto_runtime_is_the_fastest_installed_one(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda: BF16_CPU)
    monkeypatch.setattr(openvino_runner, "openvino_available", lambda: True)
    assert runtime.resolve_runtime("auto", "auto") == "openvino"  # OpenVINO runs fp32 and bf16
    assert runtime.resolve_runtime("openvino", "bf16") == "openvino"
    monkeypatch.setattr(openvino_runner, "openvino_available", lambda: False)
    monkeypatch.setattr(onnx_runner, "onnx_available", lambda: True)
    assert runtime.resolve_runtime("auto", "auto") == "torch"  # bf16, and ONNX Runtime has no bf16 path
    assert runtime.resolve_runtime("auto", "fp32") == ("onnx" if runtime.AUTO_PREFERS_ONNX else "torch")
    monkeypatch.setattr(onnx_runner, "onnx_available", lambda: False)
    assert runtime.resolve_runtime("auto", "fp32") == "torch"
    assert runtime.resolve_runtime("torch", "bf16") == "torch"
    with pytest.raises(ValueError, match="fp32 only"):
        runtime.resolve_runtime("onnx", "bf16")
    with pytest.raises(ValueError, match="runtime must be"):
        runtime.resolve_runtime("tensorrt", "fp32")


def test_cpu_features_are_read_from_cpuinfo_flags():
    avx2 = parse_cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 fma avx_vnni\n")
    assert avx2.avx2 and avx2.avx_vnni and not avx2.avx512f
    assert not avx2.has_any(cpu.BF16_NATIVE_FEATURES)
    assert parse_cpuinfo("flags\t: avx512f avx512_bf16\n").has_any(cpu.BF16_NATIVE_FEATURES)
    assert parse_cpuinfo("flags\t: amx_bf16 amx_tile amx_int8\n").amx_int8
    assert parse_cpuinfo("Features\t: fp asimd bf16\n") == CpuFeatures()  # ARM: none of these x86 features
    assert isinstance(cpu.cpu_features(), CpuFeatures)  # this machine, whatever it is


def test_int8_plugged_in_as_data(monkeypatch):
    """int8 is a PRECISION_TABLE entry and OpenVINO's declaration; it is native with VNNI and never auto."""
    monkeypatch.setattr(openvino_runner, "openvino_available", lambda: True)
    assert runtime.runtimes_for("int8") == ["openvino"]
    assert runtime.resolve_runtime("auto", "int8") == "openvino"
    with pytest.raises(ValueError, match="runs bf16, fp32 only"):
        runtime.resolve_runtime("torch", "int8")
    monkeypatch.setattr(cpu, "cpu_features", lambda: CpuFeatures(avx512_vnni=True))
    assert PRECISION_TABLE["int8"].is_native(cpu.cpu_features()) and PRECISION_TABLE["int8"].calibrated
    assert not PRECISION_TABLE["int8"].is_native(AVX2_ONLY)
    assert runtime.resolve_precision("auto") == "fp32"  # not in AUTO_PRECISION_ORDER: int8 must be asked for
    with pytest.raises(ValueError, match="unknown CPU features"):
        Precision("int4", native_on=("avx_int4",))


# ----------------------------------------------------------------------------- the Runner interface


def test_every_runner_declares_its_capabilities():
    with pytest.raises(TypeError):
        Runner()  # abstract
    for name, cls in runtime.RUNNERS.items():
        assert issubclass(cls, Runner) and not inspect.isabstract(cls)
        assert cls.name == name and name in runtime.RUNTIMES
        assert "fp32" in cls.precisions <= set(PRECISION_TABLE)
        assert isinstance(cls.uint8_input, bool) and cls.default_batch_size >= 1
        assert runtime.default_batch_size(name) == runtime.DEFAULT_BATCH_SIZE[name] == cls.default_batch_size
    assert runtime.default_batch_size("torch") == 8 and runtime.default_batch_size("onnx") >= 16  # as measured
    assert runtime.OpenVinoRunner.uint8_input and not runtime.TorchRunner.uint8_input
    assert runtime.OnnxRunner.precisions == {"fp32"}


@pytest.mark.parametrize("name", ["torch", "onnx", "openvino"])
def test_each_runner_embeds_a_batch(lite0, name):
    cls = runtime.RUNNERS[name]
    if not cls.available():
        pytest.skip(f"{name} is not installed")
    runner = runtime.get_runner(lite0, name, "fp32")
    assert isinstance(runner, cls) and runner.precision == "fp32"
    crops = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    if runner.uint8_input:  # normalisation is inside its graph
        batch = crops
    else:
        batch = normalize(crops, lite0.config.preprocessing).contiguous(memory_format=runner.input_memory_format)
    out = runner(batch)
    assert out.shape == (3, 1280) and out.dtype == torch.float32


def test_get_runner_returns_the_cached_runner_for_the_same_key(lite0):
    fp32 = runtime.get_runner(lite0, "torch", "fp32")
    assert runtime.get_runner(lite0, "torch", "fp32") is fp32
    bf16 = runtime.get_runner(lite0, "torch", "bf16")
    assert bf16 is not fp32 and bf16.precision == "bf16"
    assert runtime.get_runner(lite0, "torch", "bf16") is bf16


@needs_openvino
def test_compiled_runners_are_shared_by_backbone_identity(lite0):
    """Two loads of one backbone share a compiled network (same files); each module keeps its own eager runner."""
    from dn2.backbones import load_backbone

    again = load_backbone("efficientnet_lite0")
    assert runtime.get_runner(again, "openvino", "fp32") is runtime.get_runner(lite0, "openvino", "fp32")
    assert runtime.get_runner(again, "torch", "fp32") is not runtime.get_runner(lite0, "torch", "fp32")


def test_runner_cache_is_bounded(lite0, monkeypatch):
    monkeypatch.setattr(runtime, "RUNNER_CACHE_SIZE", 2)
    nets = [tiny_backbone(lite0, f"tiny{i}") for i in range(3)]
    runners = [weakref.ref(runtime.get_runner(net, "torch", "fp32")) for net in nets[:2]]  # cached: 0, 1
    assert runtime.get_runner(nets[0], "torch", "fp32") is runners[0]()  # a hit: 0 is now the most recent
    runtime.get_runner(nets[2], "torch", "fp32")  # one too many: the least recently used (1) is dropped
    gc.collect()
    assert runners[1]() is None  # and freed: a long-lived process does not accumulate compiled networks
    assert runtime.get_runner(nets[0], "torch", "fp32") is runners[0]()
    runtime.clear_runner_cache()
    gc.collect()
    assert runners[0]() is None


# ----------------------------------------------------------------------------- falling back to PyTorch


def test_onnx_export_failure_falls_back_to_torch(lite0, images, export_cache, monkeypatch):
    def broken(backbone, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_runner, "export_onnx", broken)
    monkeypatch.setattr(onnx_runner, "onnx_available", lambda: True)
    with pytest.warns(UserWarning, match="exporter exploded"):
        runner = runtime.get_runner(lite0, "onnx", "fp32")
    assert isinstance(runner, runtime.TorchRunner) and runner.precision == "fp32"
    with pytest.warns(UserWarning, match="exporter exploded"):  # not remembered: tried again next time
        got = embed(lite0, images, "onnx")
    np.testing.assert_array_equal(got, embed(lite0, images, "torch"))


@needs_openvino
def test_openvino_conversion_failure_falls_back_to_torch(lite0, images, export_cache, monkeypatch):
    def broken(module, path, example):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(openvino_runner, "export_openvino", broken)
    with pytest.warns(UserWarning, match="converter exploded"):
        got = embed(lite0, images, "openvino")
    np.testing.assert_array_equal(got, embed(lite0, images, "torch"))
    with pytest.warns(UserWarning, match="converter exploded"):
        fallback = runtime.get_runner(lite0, "openvino", "bf16")
    assert (fallback.name, fallback.precision) == ("torch", "bf16")  # same precision, other runtime


def test_a_missing_runtime_package_falls_back_to_torch(lite0, monkeypatch):
    monkeypatch.setattr(onnx_runner, "onnx_available", lambda: False)
    monkeypatch.setattr(openvino_runner, "openvino_available", lambda: False)
    assert runtime.resolve_runtime("auto", "fp32") == "torch"
    with pytest.warns(UserWarning, match="onnxruntime"):
        assert runtime.get_runner(lite0, "onnx", "fp32").name == "torch"
    with pytest.warns(UserWarning, match="pip install openvino"):
        assert runtime.get_runner(lite0, "openvino", "fp32").name == "torch"


# ----------------------------------------------------------------------------- same embeddings everywhere


@needs_onnx
def test_onnx_matches_torch_fp32(lite0, images, export_cache):
    ref = embed(lite0, images, "torch")
    got = embed(lite0, images, "onnx", batch_size=2)
    assert got.shape == ref.shape == (5, 1280)
    assert _rel(got, ref) < 1e-4
    files = list((export_cache / "onnx").glob("efficientnet_lite0-*.onnx"))
    assert files == [runtime.onnx_cache_path(lite0)]  # exported into $DN2_CACHE/onnx, keyed by name + hash
    assert _rel(embed(lite0, images, "onnx", flip=True), embed(lite0, images, "torch", flip=True)) < 1e-4


def test_export_cache_key_changes_with_weights_and_crop(lite0):
    def fake(weights_id, crop):
        config = replace(lite0.config, preprocessing=replace(lite0.config.preprocessing, crop=crop))
        return Backbone(nn.Identity(), nn.Identity(), config, weights_id)

    base = runtime.onnx_cache_path(fake("sha256:a", 224), "/c")
    assert base == runtime.onnx_cache_path(fake("sha256:a", 224), "/c")
    assert base != runtime.onnx_cache_path(fake("sha256:b", 224), "/c")
    assert base != runtime.onnx_cache_path(fake("sha256:a", 256), "/c")


@needs_openvino
def test_openvino_matches_torch_fp32(lite0, images, export_cache):
    ref = embed(lite0, images, "torch")
    got = embed(lite0, images, "openvino", batch_size=2)
    assert got.shape == ref.shape == (5, 1280)
    assert _rel(got, ref) < 1e-4  # normalisation inside the graph, fp32 weights: the same embeddings
    xml = runtime.openvino_cache_path(lite0)
    assert xml.parent == export_cache / "openvino" and xml.is_file()
    n_params = sum(p.numel() for p in lite0.body.parameters())  # the embedding network, without the classifier
    assert xml.with_suffix(".bin").stat().st_size >= 4 * n_params * 0.9  # weights saved as fp32 (fp16: half)
    assert _rel(embed(lite0, images, "openvino", flip=True), embed(lite0, images, "torch", flip=True)) < 1e-4


# ----------------------------------------------------------------------------- the caller's module


def module_state(net: nn.Module) -> dict:
    """Everything a runner could change on a module: attributes of every submodule, tensor layouts."""
    return {
        "attributes": {name: sorted(vars(m)) for name, m in net.named_modules()},
        "tensors": {name: (t.stride(), t.data_ptr()) for name, t in [*net.named_parameters(), *net.named_buffers()]},
    }


def test_extract_leaves_the_backbone_module_as_it_was(images):
    from dn2.backbones import load_backbone

    net = load_backbone("efficientnet_lite0")
    before = module_state(net)
    paths = [("torch", "fp32")] + [(name, "fp32") for name in ("onnx", "openvino") if runtime.RUNNERS[name].available()]
    if runtime.cpu_supports_bf16():  # emulated bf16 is too slow for a unit test
        paths += [("torch", "bf16")] + [("openvino", "bf16")] * runtime.openvino_available()
    for name, precision in paths:
        embed(net, images[:2], name, precision)
        assert module_state(net) == before, (name, precision)  # no channels-last conversion, no cached runner
    assert not any(k.startswith("_dn2") for k in vars(net))


def test_skipped_images_are_logged_not_printed(tmp_path, capfd, caplog):
    from PIL import Image

    from dn2.backbones import load_backbone

    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "good.png")
    caplog.set_level(logging.INFO, logger="dn2")
    with pytest.warns(UserWarning, match="skipping .*bad.png"):
        emb = extract(load_backbone("efficientnet_lite0"), tmp_path, runtime="torch", precision="fp32",
                      progress=False, num_workers=0, skip_bad=True)
    assert emb.names == ["good.png"] and len(emb.skipped) == 1
    assert capfd.readouterr().err == ""  # the library prints nothing; the application decides
    logged = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("dn2")]
    assert logged == [("dn2.features", "INFO", "skipped 1 bad image(s) of 2")]


def test_torch_bf16_runs_under_the_guard(lite0, images, monkeypatch):
    """The torch runner's bf16 is mixed_bf16 (its numerics are checked in test_runtime_bf16.py, on the module:
    a first bf16 pass through a channels-last network takes about a minute where bf16 is emulated)."""
    import contextlib

    from dn2.runtime import torch_runner

    calls = []

    @contextlib.contextmanager
    def spy(backbone, enabled=True):
        calls.append(enabled)
        yield []

    monkeypatch.setattr(torch_runner, "mixed_bf16", spy)
    embed(lite0, images[:1], "torch", "bf16")
    embed(lite0, images[:1], "torch", "fp32")
    assert calls == [True, False]
    with pytest.raises(ValueError, match="fp32 only"):
        embed(lite0, images[:1], "onnx", "bf16")
    if runtime.openvino_available():  # OpenVINO's bf16 is its own (early piece compiled fp32), not the torch guard
        embed(lite0, images[:1], "openvino", "bf16")
        assert calls == [True, False]


def test_docstring_examples_run():
    import doctest

    import dn2.features
    from dn2.runtime import base, bf16, torch_runner

    for module in (runtime, cpu, base, bf16, torch_runner, onnx_runner, openvino_runner, dn2.features):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


# ----------------------------------------------------------------------------- forked decoding workers

REPRO = """
import gc, sys, numpy as np, torch
from dn2 import runtime
from dn2.backbones import load_backbone
from dn2.features import extract
from dn2.images import ImageSource, as_source

class CollectingSource(ImageSource):
    # Images whose loading runs the garbage collector: a worker's collector runs sooner or later.
    def __init__(self, inner):
        self.inner = inner
    def __len__(self):
        return len(self.inner)
    def name(self, i):
        return self.inner.name(i)
    def load(self, i, max_side=None):
        gc.collect()
        return self.inner.load(i, max_side)

gc.disable()
net = load_backbone("efficientnet_lite0")
runner = runtime.get_runner(net, "openvino", "fp32")
assert runner.name == "openvino"
runner(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
runtime.clear_runner_cache()
cycle = [runner]; cycle.append(cycle)  # garbage that only the cyclic collector frees
del runner, cycle
source = CollectingSource(as_source(np.zeros((4, 32, 32, 3), np.uint8)))
print(extract(net, source, runtime="torch", num_workers=1, progress=False).vectors.shape)
"""


@needs_openvino
def test_decoding_workers_survive_openvino_garbage(tmp_path):
    """A compiled OpenVINO model left as garbage must not hang the forked decoding workers (it did:
    destroyed in the child, it waits for executor threads that only exist in the parent)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DN2_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", REPRO], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(4, 1280)"
