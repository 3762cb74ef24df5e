"""Shared fixtures: the embedded default backbone (loaded once) and small generated image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session", autouse=True)
def _private_dn2_cache(tmp_path_factory):
    """Exported networks and cached embeddings of the test run go to a temporary folder, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DN2_CACHE", str(tmp_path_factory.mktemp("dn2-cache")))
    yield
    mp.undo()


@pytest.fixture
def export_cache(tmp_path, monkeypatch):
    """A fresh $DN2_CACHE: exports land in <tmp>/onnx, <tmp>/openvino, <tmp>/openvino-int8."""
    monkeypatch.setenv("DN2_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def lite0():
    from dn2.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


def make_image(kind: str, seed: int, size: int = 48) -> Image.Image:
    """A small RGB test image: 'stripes' (normal) or 'blob' (anomalous) with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        period = 6 + seed % 3
        base = (np.sin(2 * np.pi * x / period) > 0).astype(np.float32)
        rgb = np.stack([base * 200 + 30, base * 60 + 40, base * 30 + 20], axis=-1)
    else:
        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
        base = (((x - cx) ** 2 + (y - cy) ** 2) < (size // 4) ** 2).astype(np.float32)
        rgb = np.stack([base * 30 + 20, base * 180 + 50, base * 220 + 30], axis=-1)
    rgb = rgb + rng.normal(0, 8, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture
def image_folders(tmp_path: Path) -> dict[str, Path]:
    """normal/ (12 stripe images), test/ (3 stripes + 3 blobs)."""
    normal, test = tmp_path / "normal", tmp_path / "test"
    normal.mkdir()
    (test / "good").mkdir(parents=True)
    (test / "bad").mkdir(parents=True)
    for i in range(12):
        make_image("stripes", i).save(normal / f"n{i:02d}.png")
    for i in range(3):
        make_image("stripes", 100 + i).save(test / "good" / f"g{i}.png")
        make_image("blob", 200 + i).save(test / "bad" / f"b{i}.jpg")
    return {"root": tmp_path, "normal": normal, "test": test}
