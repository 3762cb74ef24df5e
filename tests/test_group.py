"""Group anomaly detection: pooling against numpy, set detectors on embeddings and on images."""

from __future__ import annotations

import numpy as np
import pytest

from dn2.group import GroupDN2, SetDetector, covariance_trace, pool_set, pool_sets


def test_pooling_matches_numpy():
    members = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(pool_set(members, "mean"), members.mean(0))
    np.testing.assert_array_equal(pool_set(members, "max"), members[2])
    np.testing.assert_array_equal(pool_set(members, "concat"), members.ravel())
    with pytest.raises(ValueError, match="equal size"):
        pool_sets([members, members[:2]], "concat")


def test_mean_and_max_pooling_are_orderless_concat_is_not():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(4, 6))
    shuffled = members[[2, 0, 3, 1]]
    for pooling in ("mean", "max"):
        np.testing.assert_allclose(pool_set(members, pooling), pool_set(shuffled, pooling), rtol=1e-6)
    assert not np.allclose(pool_set(members, "concat"), pool_set(shuffled, "concat"))


def test_covariance_trace_is_total_variance():
    rng = np.random.default_rng(1)
    members = rng.normal(size=(20, 5))
    assert covariance_trace(members) == pytest.approx(np.trace(np.cov(members.T)))
    assert covariance_trace(np.ones((5, 3))) == 0.0


def test_set_detector_finds_sets_that_mix_the_wrong_members():
    # Normal sets: one member from each of 3 clusters. Anomalous: 3 members of one cluster.
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 16)) * 5

    def normal_set():
        return centres + rng.normal(size=(3, 16)) * 0.3

    def anomalous_set():
        return centres[[rng.integers(3)] * 3] + rng.normal(size=(3, 16)) * 0.3

    det = SetDetector(pooling="mean", k=2).fit([normal_set() for _ in range(100)])
    scores_normal = det.anomaly_score([normal_set() for _ in range(20)])
    scores_anom = det.anomaly_score([anomalous_set() for _ in range(20)])
    assert scores_normal.max() < scores_anom.min()
    assert (det.predict([anomalous_set() for _ in range(5)]) == -1).all()


def test_group_dn2_on_images():
    from conftest import make_image

    normal_sets = [[make_image("stripes", 3 * s + j) for j in range(2)] for s in range(6)]
    model = GroupDN2(backbone="efficientnet_lite0", pooling="mean", progress=False).fit(normal_sets)
    scores = model.anomaly_score([[make_image("stripes", 90), make_image("stripes", 91)],
                                  [make_image("blob", 92), make_image("blob", 93)]])
    assert scores[0] < scores[1]


def test_group_dn2_refits_with_the_backbone_set_after_construction():
    """set_params(backbone=...) then fit must use the new backbone (it used to keep the first embedder)."""
    from conftest import make_image

    sets = [[make_image("stripes", 3 * s + j, size=32) for j in range(2)] for s in range(4)]
    model = GroupDN2(backbone="efficientnet_lite0", weights="random", progress=False).fit(sets)
    lite0 = model.anomaly_score(sets[:1])
    model.set_params(backbone="efficientnet_lite1").fit(sets)
    assert model.embedder_.backbone == "efficientnet_lite1"
    assert model.anomaly_score(sets[:1]) != lite0
