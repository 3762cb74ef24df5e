"""Tests for dn2.search: exact kNN (tiled; fp32 or bf16 screening) vs brute force, leave-one-out, FAISS, k-means."""

import warnings

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from dn2 import runtime
from dn2.search import kmeans, knn, knn_score, make_index, recall_at_k, screening_precision


def brute_force(train, queries, k, exclude_self=False):
    """Reference kNN in float64 numpy; ties broken by lower index (stable sort)."""
    d = cdist(queries.astype(np.float64), train.astype(np.float64))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def clustered(n, dim=16, centres=10, seed=0):
    """Well-separated Gaussian blobs: easy data on which approximate indexes should be near exact."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=10.0, size=(centres, dim))
    return (means[rng.integers(centres, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(300, 24)).astype(np.float32), rng.normal(size=(50, 24)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 17])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_knn_matches_brute_force(data, k, chunk_size):
    train, queries = data
    dist, idx = knn(train, queries, k, chunk_size=chunk_size)
    ref_d, ref_i = brute_force(train, queries, k)
    assert dist.shape == idx.shape == (50, k)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_knn_exact_with_large_common_offset():
    # A large common offset makes ||q||^2 - 2 q.t + ||t||^2 lose most digits in float32 (needs centring).
    rng = np.random.default_rng(2)
    train = (rng.normal(size=(200, 16)) + 1000.0).astype(np.float32)
    queries = (rng.normal(size=(20, 16)) + 1000.0).astype(np.float32)
    dist, idx = knn(train, queries, 3)
    ref_d, ref_i = brute_force(train, queries, 3)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5)
    np.testing.assert_array_equal(idx, ref_i)


def test_knn_distances_recomputed_exactly():
    # Two far groups (so centring cannot help): each query has neighbours at distances 1, 2, 3, a gap the
    # float32 expansion still ranks correctly but whose squared values it gets wrong by ~0.1.
    rng = np.random.default_rng(3)
    queries = (300.0 + 20.0 * rng.normal(size=(10, 16))).astype(np.float32)
    units = rng.normal(size=(10, 3, 16))
    units /= np.linalg.norm(units, axis=2, keepdims=True)
    near = queries[:, None, :] + np.array([1.0, 2.0, 3.0])[None, :, None] * units
    far = np.vstack([300.0 + 20.0 * rng.normal(size=(50, 16)), -300.0 + 20.0 * rng.normal(size=(80, 16))])
    train = np.vstack([near.reshape(30, 16), far]).astype(np.float32)
    dist, idx = knn(train, queries, 3)
    ref_d, ref_i = brute_force(train, queries, 3)
    np.testing.assert_array_equal(idx, np.arange(30).reshape(10, 3))
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5)


def numpy_knn(train, queries, k, exclude_self=False):
    """Brute force with np.linalg.norm in float64: (dist, idx, all distances); ties go to the lower index."""
    full = np.linalg.norm(queries[:, None, :].astype(np.float64) - train[None, :, :].astype(np.float64), axis=2)
    if exclude_self:
        np.fill_diagonal(full, np.inf)
    idx = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, idx, axis=1), idx, full


@pytest.mark.parametrize("block_rows", [1, 7, 64])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_tiled_knn_matches_numpy(block_rows, exclude_self):
    # Train rows taken 1, 7 or 64 at a time (each block's best merged into a running best), queries 16 at
    # a time: the same answer as brute force for k from 1 to every row, duplicates ranked by index.
    rng = np.random.default_rng(4)
    train = rng.normal(size=(90, 8)).astype(np.float32)
    train[[10, 40]] = train[70]  # three copies of one row
    queries = None if exclude_self else np.vstack([train[70], rng.normal(size=(20, 8))]).astype(np.float32)
    q = train if queries is None else queries
    k_max = len(train) - 1 if exclude_self else len(train)
    for k in (1, 3, k_max):
        dist, idx = knn(train, queries, k, exclude_self=exclude_self, chunk_size=16, block_rows=block_rows)
        ref_d, ref_i, full = numpy_knn(train, q, k, exclude_self)
        np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-6)
        if k < k_max:
            np.testing.assert_array_equal(idx, ref_i)
        else:  # all rows: the same set, in an order the float64 distances agree with (float32 near-ties aside)
            np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(ref_i, axis=1))
            np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), ref_d, rtol=1e-5, atol=1e-6)
    dist, idx = knn(train, queries, 3, exclude_self=exclude_self, chunk_size=16, block_rows=block_rows)
    if exclude_self:  # each copy finds the other two, never itself
        assert idx[10, :2].tolist() == [40, 70] and idx[70, :2].tolist() == [10, 40]
        np.testing.assert_array_equal(dist[[10, 40, 70], :2], 0.0)
    else:  # a query equal to the copies finds all three, lowest index first
        assert idx[0].tolist() == [10, 40, 70] and np.all(dist[0] == 0.0)


def test_bf16_screening_gives_fp32_neighbours_and_exact_distances():
    # bf16 only screens candidates: the distances are recomputed in fp32, so on data without near-ties
    # the answer is the fp32 one, and the DN2 score agrees with brute force. (On tight clusters far apart,
    # like `clustered`, bf16 rounding of the rows is large against the neighbour distances: use fp32.)
    rng = np.random.default_rng(6)
    train, queries = rng.normal(size=(2000, 256)).astype(np.float32), rng.normal(size=(200, 256)).astype(np.float32)
    d16, i16 = knn(train, queries, 5, precision="bf16")
    d32, i32 = knn(train, queries, 5, precision="fp32")
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(d16, d32, rtol=1e-6)
    ref_d, _ = brute_force(train, queries, 5)
    np.testing.assert_allclose(knn_score(d16), ref_d.mean(axis=1), rtol=1e-4)
    # Leave-one-out, through the exact index, in blocks of 300 train rows.
    d16, i16 = knn(train, None, 5, exclude_self=True, block_rows=300, precision="bf16")
    d32, i32 = make_index("exact", precision="fp32").fit(train).search_self(5)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(d16, d32, rtol=1e-6)


def test_auto_precision_is_bf16_only_on_native_bf16_cpus_and_large_problems(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert screening_precision("auto", 10_000, 10**6, 2048) == "fp32"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert screening_precision("auto", 10_000, 10**6, 2048) == "bf16"
    assert screening_precision("auto", 50, 300, 24) == "fp32"  # too small for bf16 to pay
    assert screening_precision("fp32", 10_000, 10**6, 2048) == "fp32"  # explicit choices are kept
    assert screening_precision("bf16", 50, 300, 24) == "bf16"


def test_queries_none_finds_each_row_itself(data):
    train, _ = data
    dist, idx = knn(train, None, 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(len(train)))
    np.testing.assert_array_equal(dist[:, 0], 0.0)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_leave_one_out_keeps_exact_duplicates(data, chunk_size):
    train = data[0][:60].copy()
    train[10] = train[20]  # an exact duplicate pair
    train[30] = train[31] = train[32]  # a triple
    dist, idx = knn(train, None, 4, exclude_self=True, chunk_size=chunk_size)
    rows = np.arange(len(train))[:, None]
    assert not np.any(idx == rows)
    ref_d, ref_i = brute_force(train, train, 4, exclude_self=True)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idx, ref_i)
    assert idx[10, 0] == 20 and idx[20, 0] == 10 and dist[10, 0] == 0.0
    assert set(idx[31, :2]) == {30, 32} and np.all(dist[31, :2] == 0.0)


def test_knn_score_is_mean_distance(data):
    train, queries = data
    dist, _ = knn(train, queries, 5)
    np.testing.assert_allclose(knn_score(dist), dist.mean(axis=1), rtol=1e-6)
    assert knn_score(dist).shape == (50,)


def test_knn_accepts_read_only_arrays_without_warning(data):
    train, queries = data
    train.setflags(write=False)  # like np.load(..., mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist, _ = knn(train, queries, 2)
    np.testing.assert_allclose(dist, brute_force(train, queries, 2)[0], rtol=1e-5)


def test_knn_empty_queries(data):
    dist, idx = knn(data[0], np.empty((0, 24), np.float32), 3)
    assert dist.shape == idx.shape == (0, 3)


def _with(a, pos, value):
    a = a.copy()
    a[pos] = value
    return a


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t, q: knn(_with(t, (3, 1), np.nan), q, 2), "NaN or infinite"),
        (lambda t, q: knn(t, _with(q, (0, 0), np.inf), 2), "NaN or infinite"),
        (lambda t, q: knn(t, q[:, :10], 2), "features"),
        (lambda t, q: knn(t[0], q, 2), "2-D"),
        (lambda t, q: knn(t, q, 0), "k must be between 1 and 300"),
        (lambda t, q: knn(t, q, 301), "k must be between 1 and 300"),
        (lambda t, q: knn(t, None, 300, exclude_self=True), "between 1 and 299"),
        (lambda t, q: knn(t, q, 2, exclude_self=True), "queries=None"),
        (lambda t, q: knn(t, q, 2, chunk_size=0), "chunk_size"),
        (lambda t, q: knn(t, q, 2, block_rows=0), "block_rows"),
        (lambda t, q: knn(t, q, 2, precision="fp16"), r"precision must be one of \('auto', 'fp32', 'bf16'\)"),
        (lambda t, q: make_index("exact", precision="fp16"), "precision must be one of"),
        (lambda t, q: knn(_with(t, (0, 0), 1e30), q, 2), "too large"),
    ],
)
def test_knn_validation(data, call, match):
    with pytest.raises(ValueError, match=match):
        call(*data)


def test_flat_index_matches_exact(data):
    train, queries = data
    index = make_index("flat").fit(train)
    assert index.ntotal == 300 and index.kind == "flat"
    dist, idx = index.search(queries, 5)
    ref_d, ref_i = brute_force(train, queries, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4)  # faiss computes squared L2 by expansion


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_search_self_matches_brute_force(data, kind):
    train = data[0]
    dist, idx = make_index(kind).fit(train).search_self(4)
    ref_d, ref_i = brute_force(train, train, 4, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-5)


def test_search_self_drops_last_column_when_self_not_returned():
    # Six identical rows: with k+1=3 hits a row may get three *other* copies; it must never list itself.
    X = np.vstack([np.ones((6, 4)), np.zeros((3, 4))]).astype(np.float32)
    dist, idx = make_index("flat").fit(X).search_self(2)
    assert dist.shape == idx.shape == (9, 2)
    assert not np.any(idx == np.arange(9)[:, None])
    np.testing.assert_array_equal(dist, 0.0)


@pytest.mark.parametrize(
    "kind, params",
    [("exact", {"chunk_size": 64}), ("exact", {"precision": "bf16"}), ("flat", {}), ("ivf", {}),
     ("ivf", {"nlist": 20, "nprobe": 4}), ("ivf", {"precision": "bf16"}), ("ivf_faiss", {}),
     ("ivf_faiss", {"nlist": 8, "nprobe": 2}), ("hnsw", {}), ("ivfpq", {})],
)
def test_indexes_recall_on_clustered_data(kind, params):
    train, queries = clustered(2000), clustered(100, seed=5)
    index = make_index(kind, **params).fit(train)
    dist, idx = index.search(queries, 10)
    ref_d, ref_i = brute_force(train, queries, 10)
    assert recall_at_k(idx, ref_i) >= 0.9
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    found = idx == ref_i  # where the approximate search got the true neighbour, its distance is exact
    np.testing.assert_allclose(dist[found], ref_d[found], rtol=1e-4)


def test_make_index_rejects_unknown_kind_and_params():
    with pytest.raises(ValueError, match="hnsw"):
        make_index("annoy")
    with pytest.raises(ValueError, match="nprobe"):
        make_index("ivf", nprob=4)
    with pytest.raises(ValueError, match=r"known: \['chunk_size', 'precision'\]"):
        make_index("exact", block=4)
    with pytest.raises(ValueError, match="m=5 must divide"):
        make_index("ivfpq", m=5).fit(clustered(100))
    with pytest.raises(RuntimeError, match="fit"):
        make_index("hnsw").search(np.zeros((1, 4), np.float32), 1)


def test_index_search_validation(data):
    index = make_index("flat").fit(data[0])
    with pytest.raises(ValueError, match="k must be between 1 and 300"):
        index.search(data[1], 301)
    with pytest.raises(ValueError, match="features"):
        index.search(data[1][:, :5], 1)


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(exact[:, ::-1], exact) == 1.0
    assert recall_at_k(np.array([[0, 9, 9], [3, 4, -1]]), exact) == pytest.approx(3 / 6)


def test_kmeans_centres_reduce_inertia_and_are_deterministic():
    X = clustered(1000, dim=8, centres=5, seed=3)
    centres = kmeans(X, 5, seed=0)
    assert centres.shape == (5, 8) and centres.dtype == np.float32

    def inertia(c):
        return (cdist(X, c, "sqeuclidean").min(axis=1)).sum()

    random_points = X[np.random.default_rng(0).choice(len(X), 5, replace=False)]
    assert inertia(centres) < 0.8 * inertia(random_points)
    np.testing.assert_array_equal(centres, kmeans(X, 5, seed=0))


def test_kmeans_edge_cases():
    X = clustered(20, dim=4)
    full = kmeans(X, 20)
    np.testing.assert_array_equal(full, X)
    assert full is not X
    with pytest.raises(ValueError, match="n_centres"):
        kmeans(X, 21)
    with pytest.raises(ValueError, match="n_centres"):
        kmeans(X, 0)


def test_faiss_ivf_trains_on_a_sample_of_large_training_sets():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 16)).astype(np.float32)
    index = make_index("ivf_faiss", nlist=4, nprobe=4, train_rows=500).fit(X)
    assert len(index.training_sample(X)) == 500 and index.ntotal == 3000  # every row is still indexed
    dist, idx = index.search(X[:5], 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))  # nprobe = nlist: exhaustive, exact


def far_clusters(n, dim=32, seed=0):
    """Two tight clusters 100 apart: the centred rows are ~150x longer than neighbour distances, so bf16
    rounding of the rows (~2^-8 of their length) reorders near-tied neighbours."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(dim)
    mu[0] = 50.0
    return np.vstack([mu + 0.5 * rng.normal(size=(n, dim)), -mu + 0.5 * rng.normal(size=(n, dim))]).astype(np.float32)


def test_bf16_screening_of_near_ties_still_returns_the_true_neighbours():
    # Regression: bf16 screening alone (k + 32 candidates) missed true neighbours here in most queries.
    # The certificate sees that the bf16 error exceeds the gap and redoes those queries in fp32.
    train, queries = far_clusters(300), far_clusters(10, seed=1)
    stats = {}
    dist, idx = knn(train, queries, 2, precision="bf16", stats=stats)
    ref_d, ref_i = brute_force(train, queries, 2)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5)
    assert stats == {"precision": "bf16", "queries": 20, "uncertified": 20}
    # the same through the exact index, leave-one-out
    dist, idx = make_index("exact", precision="bf16").fit(train).search_self(3)
    ref_d, ref_i = brute_force(train, train, 3, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_i)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_certified_queries_are_not_searched_twice(precision):
    # Ordinary data: the gap between the k-th and the (k + margin)-th candidate dwarfs the rounding bound.
    rng = np.random.default_rng(7)
    train, queries = rng.normal(size=(3000, 64)).astype(np.float32), rng.normal(size=(100, 64)).astype(np.float32)
    stats = {}
    _, idx = knn(train, queries, 5, precision=precision, stats=stats)
    assert stats == {"precision": precision, "queries": 100, "uncertified": 0}
    np.testing.assert_array_equal(idx, brute_force(train, queries, 5)[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_ties_beyond_the_margin_fall_back_to_an_exhaustive_pass(precision, exclude_self):
    # 50 copies of one row (more than k + margin candidates) tie exactly: no cut can certify, so the
    # fp32 range pass computes all their distances and the lowest indices win, as in brute force.
    rng = np.random.default_rng(3)
    train = rng.normal(size=(400, 16)).astype(np.float32)
    copies = np.sort(rng.choice(400, size=50, replace=False))
    train[copies] = train[copies[-1]]
    queries = None if exclude_self else train[copies[-1]][None, :] + 0.01
    q = train if exclude_self else queries
    stats = {}
    dist, idx = knn(train, queries, 3, exclude_self=exclude_self, precision=precision, block_rows=64, stats=stats)
    ref_d, ref_i = brute_force(train, q, 3, exclude_self=exclude_self)
    rows = copies if exclude_self else [0]
    np.testing.assert_array_equal(idx[rows], ref_i[rows])
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-6)
    assert stats["uncertified"] >= len(rows)
    if exclude_self:
        assert idx[copies[0]].tolist() == copies[1:4].tolist()


def test_working_memory_setting_is_read_at_call_time(monkeypatch, data):
    # A smaller dn2.config working memory gives smaller query chunks, with the same answer.
    from dn2.config import config_context
    from dn2.search import exact

    chunks = []
    real_screen = exact.screen
    monkeypatch.setattr(exact, "screen", lambda qc, *a, **kw: chunks.append(len(qc)) or real_screen(qc, *a, **kw))
    train = np.random.default_rng(0).normal(size=(500, 512)).astype(np.float32)
    expected = knn(train, None, 3)
    assert max(chunks) == 500
    chunks.clear()
    with config_context(working_memory=1):
        got = knn(train, None, 3)
    assert max(chunks) < 500
    np.testing.assert_array_equal(got[1], expected[1])


def test_auto_precision_leaves_bf16_when_it_stops_certifying(monkeypatch):
    # On a native-bf16 CPU "auto" screens large problems in bf16; where most of a chunk's queries then
    # need the fp32 pass (near-ties everywhere), the remaining chunks are screened in fp32 directly.
    from dn2.search import exact

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(exact, "BF16_MIN_WORK", 0)
    train, queries = far_clusters(300), far_clusters(10, seed=1)
    stats = {}
    _, idx = knn(train, queries, 2, chunk_size=5, stats=stats)
    assert stats == {"precision": "bf16+fp32", "queries": 20, "uncertified": 5}  # only the first chunk redone
    np.testing.assert_array_equal(idx, brute_force(train, queries, 2)[1])
    rng = np.random.default_rng(6)  # ordinary data: bf16 certifies, and stays
    stats = {}
    knn(rng.normal(size=(2000, 64)).astype(np.float32), rng.normal(size=(40, 64)).astype(np.float32), 2,
        chunk_size=10, stats=stats)
    assert stats == {"precision": "bf16", "queries": 40, "uncertified": 0}
