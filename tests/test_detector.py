"""KNNDetector against brute-force numpy, thresholds without labels, cleaning, k-means, save/load."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

import dn2
from dn2 import KNNDetector
from dn2.modelfile import ModelFileError


def brute_force_score(train, queries, k, leave_one_out=False):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - train[None, :, :]) ** 2).sum(-1))
    if leave_one_out:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32) * 1.5


@pytest.mark.parametrize("k", [1, 2, 5])
def test_anomaly_score_is_mean_distance_to_k_nearest(data, k):
    train, test = data
    det = KNNDetector(k=k).fit(train)
    np.testing.assert_allclose(det.anomaly_score(test), brute_force_score(train, test, k), rtol=1e-5)
    np.testing.assert_allclose(det.train_scores_, brute_force_score(train, train, k, True), rtol=1e-5)


def test_sklearn_contract(data):
    train, test = data
    det = KNNDetector(k=2, fpr=0.1).fit(train)
    assert det.offset_ == -det.threshold_
    np.testing.assert_allclose(det.score_samples(test), -det.anomaly_score(test))
    np.testing.assert_allclose(det.decision_function(test), det.score_samples(test) - det.offset_)
    assert set(det.predict(test)) <= {1, -1}
    assert ((det.predict(test) == -1) == (det.anomaly_score(test) > det.threshold_)).all()


def test_fpr_threshold_flags_that_share_of_new_normal_data():
    rng = np.random.default_rng(1)
    det = KNNDetector(k=2, fpr=0.1).fit(rng.normal(size=(2000, 4)))
    flagged = (det.predict(rng.normal(size=(4000, 4))) == -1).mean()
    assert 0.06 < flagged < 0.14


def test_contamination_flags_that_share_of_training_data():
    rng = np.random.default_rng(2)
    det = KNNDetector(k=2, contamination=0.2, novelty=False)  # label the training items themselves
    labels = det.fit_predict(rng.normal(size=(500, 4)))
    assert (labels == -1).mean() == pytest.approx(0.2, abs=0.01)


def test_fit_predict_is_offered_only_without_novelty_as_in_scikit_learn():
    """fit_predict labels training items by leave-one-out scores, which differs from fit(X).predict(X):
    like LocalOutlierFactor, a novelty detector does not offer it."""
    X = np.random.default_rng(0).normal(size=(50, 3))
    assert not hasattr(KNNDetector(), "fit_predict")
    with pytest.raises(AttributeError) as error:
        KNNDetector().fit_predict(X)
    assert "novelty=False" in str(error.value.__cause__)  # says what to do instead
    assert set(KNNDetector(novelty=False).fit_predict(X)) <= {1, -1}


def test_passes_scikit_learns_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(KNNDetector(), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert failed == []


def test_cleaning_uses_the_chosen_index_not_an_exact_all_pairs_search(data, monkeypatch):
    """With index="ivf" the leave-one-out scores that decide what is cleaned come from the IVF index."""
    from dn2.search import IvfIndex

    train, _ = data
    sizes = []
    original = IvfIndex.search_self

    def recording(self, k):
        sizes.append(self.ntotal)
        return original(self, k)

    monkeypatch.setattr(IvfIndex, "search_self", recording)
    KNNDetector(k=2, clean=0.5, index="ivf", index_params={"nlist": 4, "nprobe": 4}).fit(train)
    assert sizes == [len(train), len(train) // 2]  # cleaning over all items, then the kept ones


def test_clean_training_set_drops_the_largest_leave_one_out_scores():
    from dn2.detector import clean_training_set

    scores = np.array([0.3, 9.0, 0.1, 8.0, 0.2, 0.4])
    assert clean_training_set(scores, 0.5, k=2).tolist() == [0, 2, 4]
    assert clean_training_set(scores, 0.9, k=2).tolist() == [0, 2, 4]  # at least k + 1 are kept
    assert clean_training_set(scores, 0.0, k=2).tolist() == list(range(6))


def test_clean_drops_the_planted_anomalies():
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(90, 8))
    outliers = rng.normal(size=(10, 8)) * 10.0  # scattered far from the normal cloud and each other
    det = KNNDetector(k=2, clean=0.5).fit(np.vstack([normal, outliers]))
    assert len(det.kept_) == 50
    assert (det.kept_ < 90).all()  # every kept item is a normal one
    assert len(det.memory_) == 50


def test_kmeans_compression_scores_by_distance_to_nearest_centres(data):
    train, test = data
    det = KNNDetector(k=2, n_centres=10).fit(train)
    assert det.memory_.shape == (10, 16)
    np.testing.assert_allclose(det.anomaly_score(test), brute_force_score(det.memory_, test, 2), rtol=1e-5)


def test_nearest_names_training_items(data):
    train, _ = data
    names = [f"img{i}.png" for i in range(len(train))]
    det = KNNDetector().fit(train, names=names)
    (first, second), = det.nearest(train[7:8] + 1e-4, n=2)
    assert first[0] == "img7.png" and first[1] < 1e-2
    assert second[1] >= first[1]


def test_faiss_flat_index_gives_the_same_scores(data):
    train, test = data
    exact = KNNDetector(k=2).fit(train)
    flat = KNNDetector(k=2, index="flat").fit(train)
    np.testing.assert_allclose(flat.anomaly_score(test), exact.anomaly_score(test), rtol=1e-4)
    assert flat.threshold_ == pytest.approx(exact.threshold_, rel=1e-4)


def test_ivf_index_visiting_every_cell_gives_the_exact_scores_and_cleaning(data):
    train, test = data
    exact = KNNDetector(k=2, clean=0.5).fit(train)
    ivf = KNNDetector(k=2, clean=0.5, index="ivf", index_params={"nlist": 4, "nprobe": 4}).fit(train)
    np.testing.assert_array_equal(ivf.kept_, exact.kept_)
    np.testing.assert_allclose(ivf.anomaly_score(test), exact.anomaly_score(test), rtol=1e-5)
    assert ivf.threshold_ == pytest.approx(exact.threshold_, rel=1e-5)


def test_errors_are_clear(data):
    train, test = data
    with pytest.raises(NotFittedError):
        KNNDetector().anomaly_score(test)
    with pytest.raises(ValueError, match="needs at least 3"):
        KNNDetector(k=2).fit(train[:2])
    with pytest.raises(ValueError, match="features"):
        KNNDetector().fit(train).anomaly_score(test[:, :8])
    with pytest.raises(ValueError, match="NaN"):
        KNNDetector().fit(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="2D array"):
        KNNDetector().fit(np.zeros(10))
    with pytest.raises(ValueError, match="k must be an int in"):
        KNNDetector(k=0).fit(train)
    with pytest.raises(ValueError, match="fpr must be a number in"):
        KNNDetector(fpr=2).fit(train)
    with pytest.raises(ValueError, match="unknown parameter.*nprob"):
        KNNDetector(index="ivf", index_params={"nprob": 3}).fit(train)


def test_save_load_round_trip_gives_identical_scores(data, tmp_path):
    train, test = data
    det = KNNDetector(k=3, clean=0.1, fpr=0.02).fit(train, names=[f"n{i}" for i in range(len(train))])
    path = det.save(tmp_path / "det.dn2")
    loaded = dn2.load(path)
    assert isinstance(loaded, KNNDetector)
    np.testing.assert_array_equal(loaded.anomaly_score(test), det.anomaly_score(test))
    assert loaded.threshold_ == det.threshold_ and loaded.get_params() == det.get_params()
    assert loaded.nearest(test[:1]) == det.nearest(test[:1])
    with pytest.raises(FileExistsError):
        det.save(path)


def test_tampered_and_truncated_model_files_are_rejected(data, tmp_path):
    train, _ = data
    path = KNNDetector().fit(train).save(tmp_path / "det.dn2")
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / "tampered.dn2").write_bytes(bytes(blob))
    (tmp_path / "truncated.dn2").write_bytes(path.read_bytes()[: len(blob) // 2])
    for bad in ("tampered.dn2", "truncated.dn2"):
        with pytest.raises(ModelFileError, match=bad):
            dn2.load(tmp_path / bad)


def test_an_ivf_model_reloads_its_cells_instead_of_rerunning_kmeans(data, tmp_path, monkeypatch):
    import dn2.search.ivf

    train, test = data
    det = KNNDetector(k=2, index="ivf", index_params={"nlist": 8, "nprobe": 2}).fit(train)
    path = det.save(tmp_path / "ivf.dn2")
    monkeypatch.setattr(dn2.search.ivf, "kmeans", lambda *a, **k: pytest.fail("k-means ran again on load"))
    loaded = dn2.load(path)
    np.testing.assert_array_equal(loaded.anomaly_score(test), det.anomaly_score(test))
