"""Tests for dn2.search.IvfIndex, the batched inverted-file index behind make_index("ivf")."""

import numpy as np
import pytest

from dn2.search import IvfIndex, default_nlist, ivf, knn, make_index, recall_at_k

PRECISIONS = ["fp32", "bf16"]


def blobs(n, dim=32, centres=20, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=6.0, size=(centres, dim))
    return (means[rng.integers(centres, size=n)] + spread * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_visiting_every_cell_is_exact_search(precision):
    train, queries = blobs(3000), blobs(200, seed=1)
    index = IvfIndex(nlist=30, nprobe=30, precision=precision).fit(train)
    dist, idx = index.search(queries, 5)
    ref_d, ref_i = knn(train, queries, 5, precision="fp32")
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_recall_and_exact_distances_with_few_cells_visited(precision):
    train, queries = blobs(20000, dim=64, centres=50, spread=2.0), blobs(500, dim=64, centres=50, seed=1, spread=2.0)
    index = make_index("ivf", nprobe=8, precision=precision).fit(train)
    assert len(index.centres_) == default_nlist(20000) == 141
    dist, idx = index.search(queries, 2)
    _, ref_i = knn(train, queries, 2, precision="fp32")
    assert recall_at_k(idx, ref_i) >= 0.95
    # whatever rows it returns, their distances are the exact ones, ascending
    direct = np.linalg.norm(queries[:, None, :] - train[idx], axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_cells_and_query_groups_taken_in_blocks(monkeypatch):
    # A few huge cells screened in blocks of 7 rows, for groups of 5 queries, in chunks of 13, give the same answer.
    train, queries = blobs(600, dim=8, centres=3), blobs(40, dim=8, centres=3, seed=1)
    expected = IvfIndex(nlist=3, nprobe=3, precision="fp32").fit(train).search(queries, 4)
    monkeypatch.setattr(ivf, "CELL_BLOCK", 7)
    monkeypatch.setattr(ivf, "QUERY_GROUP", 5)
    monkeypatch.setattr(ivf, "QUERY_CHUNK", 13)
    for precision in PRECISIONS:
        dist, idx = IvfIndex(nlist=3, nprobe=3, precision=precision).fit(train).search(queries, 4)
        np.testing.assert_array_equal(idx, expected[1])
        np.testing.assert_allclose(dist, expected[0], rtol=1e-6)


def test_probed_cells_with_fewer_than_k_rows_fall_back_to_exact_search():
    # 3 rows far away form their own cell: a query there, probing one cell, still gets k = 5 real neighbours.
    rng = np.random.default_rng(0)
    train = np.vstack([rng.normal(size=(400, 8)), 100 + rng.normal(size=(3, 8))]).astype(np.float32)
    index = IvfIndex(nlist=10, nprobe=1).fit(train)
    query = train[-1:] + 0.01
    dist, idx = index.search(query, 5)
    ref_d, ref_i = knn(train, query, 5)
    np.testing.assert_array_equal(idx, ref_i)
    assert np.isfinite(dist).all() and (idx >= 0).all()


def test_short_cells_are_padded_not_duplicated():
    # nprobe cells hold >= k rows together but each fewer than k + margin: every row returned once.
    train = blobs(300, dim=4, centres=30)
    dist, idx = IvfIndex(nlist=30, nprobe=2).fit(train).search(train[:50], 6)
    assert all(len(set(row)) == 6 for row in idx.tolist())
    assert np.isfinite(dist).all()


def test_search_self_leaves_each_row_out():
    train = blobs(2000)
    dist, idx = make_index("ivf", nprobe=40).fit(train).search_self(2)
    ref_d, ref_i = knn(train, None, 2, exclude_self=True)
    assert not np.any(idx == np.arange(len(train))[:, None])
    assert recall_at_k(idx, ref_i) >= 0.99


def test_bad_input_and_parameters():
    train = blobs(500, dim=8)
    with pytest.raises(ValueError, match="nprobe must be an int in"):
        IvfIndex(nprobe=0)
    with pytest.raises(ValueError, match="precision"):
        IvfIndex(precision="fp16")
    with pytest.raises(ValueError, match=r"known: \['nlist', 'nprobe', 'precision', 'train_rows'\]"):
        make_index("ivf", nprob=4)
    with pytest.raises(ValueError, match="nlist must be between 1 and the number of training rows"):
        IvfIndex(nlist=501).fit(train)
    with pytest.raises(RuntimeError, match="fit"):
        IvfIndex().search(train, 1)
    bad = train.copy()
    bad[123, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        IvfIndex(nlist=4).fit(bad)
    index = IvfIndex(nlist=4).fit(train)
    with pytest.raises(ValueError, match="features"):
        index.search(train[:, :5], 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad[120:125], 1)
    with pytest.raises(ValueError, match="k must be between 1 and 500"):
        index.search(train[:2], 501)


def test_trains_kmeans_on_a_sample_but_indexes_every_row():
    train = blobs(5000, dim=8)
    index = IvfIndex(nlist=10, nprobe=10, train_rows=300).fit(train)
    assert index.ntotal == 5000 and int(index.offsets_[-1]) == 5000
    assert sorted(index.order_.tolist()) == list(range(5000))
    dist, idx = index.search(train[:5], 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))


def test_docstring_examples_run():
    import doctest

    from dn2 import search

    for module in (ivf, search):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
