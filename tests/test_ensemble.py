"""Ensembles of backbones ("a+b"): concatenated embeddings, each part normalised on its own."""

from __future__ import annotations

import numpy as np
import pytest

import dn2
from dn2 import DN2, Embedder, KNNDetector
from dn2.cache import cached_embed
from dn2.normalize import Blockwise, make_transform

PAIR = "efficientnet_lite0+efficientnet_lite1"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (6, 40, 40, 3), dtype=np.uint8)


def test_ensemble_embedding_is_the_parts_side_by_side(images):
    ens = Embedder(backbone=PAIR, progress=False)
    a = Embedder(backbone="efficientnet_lite0", progress=False).transform(images)
    b = Embedder(backbone="efficientnet_lite1", progress=False).transform(images)
    np.testing.assert_array_equal(ens.transform(images), np.hstack([a, b]))
    assert ens.part_dims() == [1280, 1280]
    ident = ens.identity()
    assert ident["name"] == PAIR and [p["name"] for p in ident["parts"]] == PAIR.split("+")
    with pytest.raises(ValueError, match="ensemble"):
        Embedder(backbone=PAIR, weights="w.safetensors").fit()


def test_blockwise_transform_normalises_each_part_then_balances_them():
    rng = np.random.default_rng(1)
    X = np.hstack([rng.random((20, 4)) * 100, rng.random((20, 3))]).astype(np.float32)
    t = make_transform("sqrt_l2", blocks=(4, 3)).fit(X)
    assert isinstance(t, Blockwise)
    one = make_transform("sqrt_l2")
    expected = np.hstack([one.transform(X[:, :4]), one.transform(X[:, 4:])]) / np.sqrt(2)
    np.testing.assert_allclose(t.transform(X), expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(t.transform(X), axis=1), 1.0, rtol=1e-5)
    fitted = make_transform("centred_l2", blocks=(4, 3)).fit(X)
    again = make_transform("centred_l2", blocks=(4, 3)).set_state(fitted.state())
    np.testing.assert_array_equal(again.transform(X), fitted.transform(X))
    with pytest.raises(ValueError, match="blocks"):
        t.transform(X[:, :6])


def test_ensemble_detector_round_trips_and_uses_blocks(images, tmp_path):
    model = DN2(backbone=PAIR, normalize="sqrt_l2", progress=False).fit(images)
    assert model.detector.blocks == (1280, 1280)
    emb = model.embedder.transform(images[:2])
    ref = KNNDetector(k=2, normalize="sqrt_l2", blocks=(1280, 1280)).fit(model.embedder.transform(images))
    np.testing.assert_allclose(model.anomaly_score(images[:2]), ref.anomaly_score(emb), rtol=1e-6)
    loaded = dn2.load(model.save(tmp_path / "ens.dn2"))
    np.testing.assert_array_equal(loaded.anomaly_score(images[:2]), model.anomaly_score(images[:2]))
    assert loaded.detector.blocks == (1280, 1280)


def test_ensemble_cache_shares_the_single_backbone_entries(images, tmp_path):
    ens = cached_embed(Embedder(backbone=PAIR, progress=False), images, tmp_path)
    assert len(list(tmp_path.glob("*.dn2emb"))) == 2  # one per backbone
    single = cached_embed(Embedder(backbone="efficientnet_lite0", progress=False), images, tmp_path)
    np.testing.assert_array_equal(ens.vectors[:, :1280], single.vectors)
    assert len(list(tmp_path.glob("*.dn2emb"))) == 2
