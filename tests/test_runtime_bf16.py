"""bf16 without the accuracy loss: the early layers stay fp32, in PyTorch (autocast guard) and OpenVINO (pieces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dn2 import runtime
from dn2.features import extract
from dn2.runtime import bf16

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
needs_openvino = pytest.mark.skipif(not runtime.openvino_available(), reason="needs openvino")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)


def resnet18() -> nn.Module:
    import torchvision

    net = torchvision.models.resnet18(weights=None).eval()
    net.fc = nn.Identity()
    return net


def test_bf16_guard_keeps_the_early_layers_fp32(lite0):
    body = lite0.body
    keep = bf16.fp32_modules(lite0)
    early = [body.conv_stem, body.bn1, body.blocks[0], body.blocks[1]]  # stem and the first two stages
    assert keep == early
    dtypes: dict[str, torch.dtype] = {}
    watched = {"conv_stem": body.conv_stem, "bn1": body.bn1, "blocks[1]": body.blocks[1],
               "middle": body.blocks[3][0].conv_pw, "conv_head": body.conv_head}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: dtypes.__setitem__(n, o.dtype)) for n, m in watched.items()]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            ref = lite0(x)
            with bf16.mixed_bf16(lite0) as kept:
                assert kept == keep
                out = lite0(x)
    finally:
        for h in handles:
            h.remove()
    for name in ("conv_stem", "bn1", "blocks[1]"):
        assert dtypes[name] == torch.float32, name
    assert dtypes["middle"] == torch.bfloat16 and dtypes["conv_head"] == torch.bfloat16  # the rest really is bf16
    cos = nn.functional.cosine_similarity(out.float(), ref, dim=1)
    assert float(cos.min()) > 0.99
    assert not any("forward" in vars(m) for m in keep)  # wrappers removed on exit
    with torch.inference_mode():
        assert torch.equal(lite0(x), ref)


def test_bf16_autocast_runs_the_chosen_modules_in_fp32():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with torch.inference_mode(), bf16.bf16_autocast(fp32=[net[0]]):
        assert net[0](x).dtype == torch.float32
        assert net(x).dtype == torch.bfloat16
    assert "forward" not in vars(net[0])


def test_bf16_guard_finds_resnet_layers():
    body = resnet18()
    keep = bf16.fp32_modules(body)
    assert keep == [body.conv1, body.bn1, body.relu, body.maxpool, body.layer1]
    body.fc = nn.Linear(512, 10)  # unknown structure: the structural rule (first/last conv and norm, pooling)
    keep = bf16.fp32_modules(body)
    assert keep[:2] == [body.conv1, body.bn1]
    assert body.layer4[-1].conv2 in keep and body.layer4[-1].bn2 in keep and body.avgpool in keep
    assert len(keep) == 5


def test_bf16_parts_compose_to_the_network(lite0):
    """The early -> middle -> head split is the network itself; OpenVINO's bf16 guard runs early | middle+head."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for net in (lite0, resnet18()):
        assert [name for name, _ in bf16.bf16_parts(net)] == ["early", "middle", "head"]
        pieces = runtime.openvino_pieces(net, "bf16")
        assert [(name, p) for name, _, p in pieces] == [("early", "fp32"), ("middle+head", "bf16")]
        with torch.inference_mode():
            y = x
            for _, module, _ in pieces:
                y = module(y)
            torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-5)
    assert [(name, p) for name, _, p in runtime.openvino_pieces(lite0, "fp32")] == [("", "fp32")]


def test_fp32_parts_is_one_setting_under_two_names(lite0, monkeypatch):
    """Rebinding dn2.runtime.BF16_FP32_PARTS (as benchmarks do) changes what every runtime keeps in fp32,
    and which cached runner is used."""
    before = runtime.get_runner(lite0, "torch", "bf16")
    monkeypatch.setattr(runtime, "BF16_FP32_PARTS", ("early", "head"))
    assert bf16.BF16_FP32_PARTS == ("early", "head")
    assert bf16.fp32_modules(lite0)[-3:] == [lite0.body.conv_head, lite0.body.bn2, lite0.body.global_pool]
    assert [(name, p) for name, _, p in runtime.openvino_pieces(lite0, "bf16")] == [
        ("early", "fp32"), ("middle", "bf16"), ("head", "fp32")]
    assert runtime.get_runner(lite0, "torch", "bf16") is not before
    monkeypatch.undo()
    assert runtime.BF16_FP32_PARTS == bf16.BF16_FP32_PARTS == ("early",)
    assert runtime.get_runner(lite0, "torch", "bf16") is before


@needs_openvino
def test_openvino_bf16_stays_close_to_fp32(lite0, images, export_cache):
    ref = extract(lite0, images, runtime="openvino", precision="fp32", progress=False, num_workers=0).vectors
    got = extract(lite0, images, runtime="openvino", precision="bf16", progress=False, num_workers=0).vectors
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert float(cos.min()) > 0.99
    if runtime.cpu_supports_bf16():  # elsewhere OpenVINO ignores the bf16 hint and runs fp32
        diff = np.linalg.norm(got - ref, axis=1).max() / np.linalg.norm(ref, axis=1).min()
        assert diff > 1e-4  # bf16 really ran
    xmls = sorted(p.name.rsplit("-", 1)[-1] for p in (export_cache / "openvino").glob("*-*-*.xml"))
    assert xmls == ["early.xml", "middle+head.xml"]  # the pieces are cached apart from the fp32 network
