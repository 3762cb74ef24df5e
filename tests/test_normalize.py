"""Embedding transforms: each one's mechanics on generated data, and inside KNNDetector with save/load."""

from __future__ import annotations

import numpy as np
import pytest

import dn2
from dn2 import KNNDetector
from dn2.normalize import NORMALIZATIONS, make_transform


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scales = np.linspace(0.1, 5.0, 12)
    train = (rng.normal(size=(400, 12)) * scales + 3.0).astype(np.float32)
    test = (rng.normal(size=(30, 12)) * scales * 1.5 + 3.0).astype(np.float32)
    return train, test


def test_l2_rows_have_unit_norm(data):
    train, test = data
    out = make_transform("l2").fit(train).transform(test)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, test / np.linalg.norm(test, axis=1, keepdims=True), rtol=1e-6)


def test_sqrt_l2_is_unit_norm_signed_square_root(data):
    _, test = data
    out = make_transform("sqrt_l2").transform(test - 3.0)
    root = np.sign(test - 3.0) * np.sqrt(np.abs(test - 3.0))
    np.testing.assert_allclose(out, root / np.linalg.norm(root, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_centring_uses_the_training_mean_only(data):
    train, test = data
    t = make_transform("centred_l2").fit(train)
    np.testing.assert_allclose(t.mean_, train.mean(axis=0), rtol=1e-5)
    before = t.transform(test)
    t.transform(test * 100.0)  # transforming queries never refits
    np.testing.assert_allclose(t.transform(test), before)
    expected = (test - train.mean(0)) / np.linalg.norm(test - train.mean(0), axis=1, keepdims=True)
    np.testing.assert_allclose(before, expected, rtol=1e-4, atol=1e-6)


def test_standardise_gives_unit_variance_features_before_the_norm(data):
    train, _ = data
    t = make_transform("standardise").fit(train)
    np.testing.assert_allclose(((train - t.mean_) / t.scale_).std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(t.transform(train), axis=1), 1.0, rtol=1e-5)


def test_whitening_makes_the_training_covariance_identity():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(6, 6))
    train = (rng.normal(size=(5000, 6)) @ mixing + 2.0).astype(np.float32)
    t = make_transform("whiten")
    t.shrinkage = 0.0
    out = t.fit(train).transform(train)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(out, rowvar=False, bias=True), np.eye(6), atol=1e-3)


def test_whitening_distance_is_the_mahalanobis_distance():
    rng = np.random.default_rng(2)
    train = (rng.normal(size=(2000, 5)) * [1, 2, 3, 4, 5]).astype(np.float32)
    t = make_transform("whiten")
    t.shrinkage = 0.0
    t.fit(train)
    a, b = rng.normal(size=(2, 5)).astype(np.float32)
    cov = np.cov(train.astype(np.float64), rowvar=False, bias=True)
    maha = np.sqrt((a - b) @ np.linalg.inv(cov) @ (a - b))
    assert np.linalg.norm(t.transform(a[None]) - t.transform(b[None])) == pytest.approx(maha, rel=1e-4)


def test_whitening_shrinkage_keeps_few_samples_invertible():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(20, 50)).astype(np.float32)  # fewer items than features
    t = make_transform("whiten").fit(train)
    assert 0.0 < t.shrinkage_ <= 1.0
    assert np.isfinite(t.transform(rng.normal(size=(4, 50)))).all()


def test_unknown_normalization_is_a_clear_error():
    with pytest.raises(ValueError, match="normalize must be one of"):
        make_transform("cosine-ish")


@pytest.mark.parametrize("name", NORMALIZATIONS)
def test_detector_scores_are_knn_distances_in_the_transformed_space(data, name):
    train, test = data
    det = KNNDetector(k=2, normalize=name).fit(train)
    t = make_transform(name).fit(train)
    ref = KNNDetector(k=2).fit(t.transform(train))
    np.testing.assert_allclose(det.anomaly_score(test), ref.anomaly_score(t.transform(test)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(det.train_scores_, ref.train_scores_, rtol=1e-4, atol=1e-6)


def test_normalize_none_is_the_paper_score_bit_for_bit(data):
    train, test = data
    np.testing.assert_array_equal(
        KNNDetector(k=2, normalize="none").fit(train).anomaly_score(test), KNNDetector(k=2).fit(train).anomaly_score(test)
    )


@pytest.mark.parametrize("name", NORMALIZATIONS)
def test_normalised_detector_round_trips_through_save_load(data, tmp_path, name):
    train, test = data
    det = KNNDetector(k=3, normalize=name, clean=0.1).fit(train)
    loaded = dn2.load(det.save(tmp_path / "det.dn2"))
    assert loaded.normalize == name
    np.testing.assert_array_equal(loaded.anomaly_score(test), det.anomaly_score(test))
    assert loaded.threshold_ == det.threshold_


def test_normalised_detector_with_centres_scores_transformed_queries(data):
    train, test = data
    det = KNNDetector(k=2, n_centres=8, normalize="l2").fit(train)
    out = det.anomaly_score(test)
    q = test / np.linalg.norm(test, axis=1, keepdims=True)
    d = np.sqrt(((q[:, None, :] - det.memory_[None]) ** 2).sum(-1))
    np.testing.assert_allclose(out, np.sort(d, axis=1)[:, :2].mean(1), rtol=1e-4)
