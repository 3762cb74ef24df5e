"""DN2 presets, explicit overrides, multi-stage embeddings and flip TTA, save/load of a preset model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dn2
from dn2 import DN2, Embedder
from dn2.backbones import load_backbone, stage_modules
from dn2.settings import PRESETS, Method


def test_paper_preset_is_the_papers_method():
    assert DN2(preset="paper").method() == Method(backbone="efficientnet_lite0", k=2, normalize="none", stages=(),
                                                  flip=False, precision="auto")
    pre = load_backbone("efficientnet_lite0", weights="random").config.preprocessing
    assert (pre.resize, pre.crop) == (256, 224)


def test_best_preset_is_the_default_and_sets_its_documented_parameters():
    assert DN2().preset == "best"
    assert DN2().method() == PRESETS["best"]
    assert PRESETS["best"] == Method(backbone="efficientnet_lite0+efficientnet_lite2", k=2, normalize="sqrt_l2",
                                     map_backbone="efficientnet_lite2")  # its maps, when asked for: Lite2 alone


def test_explicit_parameters_override_the_preset():
    model = DN2(preset="best", backbone="efficientnet_lite0", k=5, normalize="l2", flip=False, stages=(-1,))
    assert model.method() == Method(backbone="efficientnet_lite0", k=5, normalize="l2", stages=(-1,), flip=False,
                                    map_backbone="efficientnet_lite2")
    assert DN2(preset="paper", normalize="sqrt_l2").method().normalize == "sqrt_l2"


def test_presets_are_frozen_and_overlaid_not_edited():
    with pytest.raises(AttributeError):
        PRESETS["best"].k = 7  # type: ignore[misc]
    assert PRESETS["paper"].overlay(k=7, normalize=None) == Method(k=7)  # None keeps the preset's value
    assert PRESETS["paper"].k == 2


def test_unknown_preset_and_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="preset must be one of"):
        DN2(preset="fastest").method()
    with pytest.raises(ValueError, match="normalize must be one of"):
        Method(normalize="cosine")
    with pytest.raises(ValueError, match="k must be an int"):
        Method(k=0)


def test_paper_preset_scores_are_plain_dn2_bit_for_bit(image_folders):
    test = sorted(image_folders["test"].rglob("*.*"))
    model = DN2(preset="paper", weights="random", progress=False).fit(image_folders["normal"])
    emb = Embedder(weights="random", precision="fp32", progress=False)  # the paper preset's "auto" precision
    train = emb.transform(image_folders["normal"])
    ref = dn2.KNNDetector(k=2).fit(train)
    np.testing.assert_array_equal(model.anomaly_score(test), ref.anomaly_score(emb.transform(test)))


def test_preset_model_round_trips_through_save_load(image_folders, tmp_path):
    test = sorted(image_folders["test"].rglob("*.*"))
    model = DN2(backbone="efficientnet_lite0", weights="random", stages=(-1,), progress=False).fit(image_folders["normal"])
    loaded = dn2.load(model.save(tmp_path / "m.dn2"))
    assert loaded.method_ == model.method_
    assert loaded.detector.normalize == PRESETS["best"].normalize
    np.testing.assert_array_equal(loaded.anomaly_score(test), model.anomaly_score(test))


def test_multi_stage_embedding_has_the_documented_dimension_and_parts():
    net = load_backbone("efficientnet_lite0", weights="random", stages=(-2, -1))
    plain = load_backbone("efficientnet_lite0", weights="random")
    levels = stage_modules(net.body)
    assert [c for _, c in levels] == [16, 24, 40, 112, 320]
    assert net.config.feature_dim == 112 + 320 + 1280
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        e, p = net(x), plain(x)
    assert e.shape == (2, 1712)
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    final = torch.nn.functional.normalize(p, dim=1) / 3**0.5
    np.testing.assert_allclose(e[:, -1280:].numpy(), final.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        load_backbone("efficientnet_lite0", weights="random", stages=(5,))


def test_flip_embedding_is_the_mean_of_image_and_mirror():
    images = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    flipped = Embedder(weights="random", flip=True, progress=False).transform(images)
    plain = Embedder(weights="random", progress=False)
    expected = (plain.transform(images) + plain.transform(images[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(flipped, expected, rtol=1e-5, atol=1e-6)


def test_identity_names_extraction_options_and_is_unchanged_without_them():
    plain = Embedder(weights="random", progress=False).identity()
    assert set(plain) == {"name", "weights_id", "preprocessing", "feature_dim"}
    rich = Embedder(weights="random", stages=(-1,), flip=True, progress=False).identity()
    assert rich["stages"] == [4] and rich["flip"] is True and rich["feature_dim"] == 1600


def test_auto_precision_is_fp32_for_raw_features_and_bf16_capable_after_sqrt_l2():
    """bf16 extraction cost 0.22 ROCAUC points on raw features and 0.06 after sqrt_l2 (BENCHMARKS.md):
    precision='auto' only lets the unit-norm methods use it."""
    assert DN2(preset="paper").method().extraction_precision() == "fp32"
    assert DN2(preset="best").method().extraction_precision() == "auto"  # bf16 where the CPU has it natively
    assert DN2(preset="paper", precision="bf16").method().extraction_precision() == "bf16"  # explicit wins
    assert DN2(preset="paper", normalize="sqrt_l2").method().extraction_precision() == "auto"


def test_the_fitted_precision_is_recorded_and_used_for_scoring(image_folders, tmp_path):
    """A model scores in the precision it was fitted in, after save and load too; an explicit other
    precision is honoured with a warning (dn2 score used to switch it silently)."""
    from dn2.runtime import cpu_supports_bf16

    model = DN2(preset="best", backbone="efficientnet_lite0", weights="random", progress=False)
    model.fit(image_folders["normal"])
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert model.method_.precision == expected
    loaded = dn2.load(model.save(tmp_path / "m.dn2"))
    assert loaded.method_.precision == expected and loaded.embedder.precision == expected
    other = "fp32" if expected == "bf16" else "bf16"
    with pytest.warns(UserWarning, match=f"made in {expected}"):
        assert loaded.set_params(precision=other).embedder.precision == other
