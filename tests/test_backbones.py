"""Backbones: real embedded ImageNet weights, local weight files, the torch-cache download path."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

from dn2 import backbones
from dn2.backbones import BackboneWeightsError, load_backbone, resolve_config
from dn2.features import normalize, preprocess

PALACE, DAISY = 698, 985  # ImageNet class indices


def test_embedded_lite0_recognises_sklearn_sample_photos(lite0):
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg
    pre = lite0.config.preprocessing
    batch = normalize(torch.stack([preprocess(p, pre) for p in photos]), pre)
    with torch.inference_mode():
        top3 = lite0.classify(batch).topk(3).indices.tolist()
    assert PALACE in top3[0]
    assert top3[1][0] == DAISY
    assert lite0.weights_id.startswith("sha256:")


def test_embedding_is_pooled_feature_of_last_stage(lite0):
    x = torch.zeros(2, 3, 224, 224)
    with torch.inference_mode():
        emb = lite0(x)
    assert emb.shape == (2, 1280) == (2, lite0.config.feature_dim)


def _write_random_resnet50(path):
    torch.manual_seed(1)
    model = torchvision.models.resnet50(weights=None)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_torchvision_backbone_from_local_weights_file(tmp_path):
    reference = _write_random_resnet50(tmp_path / "r50.pth")
    net = load_backbone("resnet50", weights=tmp_path / "r50.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net.classify(x), reference(x), atol=1e-5)
        assert net(x).shape == (2, 2048)


def test_weights_file_for_another_network_is_a_clear_error(tmp_path):
    _write_random_resnet50(tmp_path / "r50.pth")
    with pytest.raises(BackboneWeightsError, match="r50.pth"):
        load_backbone("resnet101", weights=tmp_path / "r50.pth")


def test_safetensors_weights_for_a_timm_model(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet10t", pretrained=False).eval()
    save_file(model.state_dict(), str(tmp_path / "r10t.safetensors"))
    net = load_backbone("timm:resnet10t", weights=tmp_path / "r10t.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net.classify(x), model(x), atol=1e-5)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_cached_torchvision_weights_are_used_without_download(tmp_path, empty_torch_home):
    cached = backbones.torchvision_cache_path(resolve_config("resnet50"))
    assert str(cached).startswith(str(empty_torch_home))
    cached.parent.mkdir(parents=True)
    _write_random_resnet50(cached)
    assert backbones.backbone_status("resnet50") == "cached"
    assert load_backbone("resnet50").weights_id.startswith("sha256:")


def test_offline_download_error_names_cache_path_and_weights_option(empty_torch_home, monkeypatch):
    # Port 9 (discard) on loopback refuses at once: the same failure as a machine without internet.
    monkeypatch.setattr(backbones, "torchvision_weights_url", lambda cfg: "http://127.0.0.1:9/resnet50-0676ba61.pth")
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone("resnet50")
    message = str(err.value)
    assert str(empty_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "--weights FILE" in message


def test_download_fills_the_torch_cache(tmp_path, empty_torch_home, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    _write_random_resnet50(served / "resnet50-test.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/resnet50-test.pth"
        monkeypatch.setattr(backbones, "torchvision_weights_url", lambda cfg: url)
        net = load_backbone("resnet50")
    finally:
        server.shutdown()
    cached = empty_torch_home / "hub" / "checkpoints" / "resnet50-test.pth"
    assert cached.is_file()
    assert net.weights_id == "sha256:" + backbones._file_sha256(served / "resnet50-test.pth")


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        resolve_config("resnet9000")


def test_random_weights_are_reproducible():
    a, b = load_backbone("efficientnet_lite0", "random"), load_backbone("efficientnet_lite0", "random")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert np.allclose(a(x).numpy(), b(x).numpy())
    assert a.weights_id == "random:0"
