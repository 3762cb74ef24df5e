"""Tests for dn2.search.kernels: the running top-k merge, tile screening and its error bounds."""

import numpy as np
import pytest
import torch

from dn2.search.kernels import (
    ResultHeap,
    bf16_row_rounding,
    bf16_screening_slack,
    centred_sq_norms,
    expansion_centre,
    fp32_screening_slack,
    screen,
)


def test_result_heap_keeps_the_k_smallest_like_a_full_sort():
    # Batches of different widths, some merged into a subset of rows only, against sorting everything.
    rng = np.random.default_rng(0)
    n, k = 50, 7
    heap = ResultHeap(n, k)
    offered = [[] for _ in range(n)]
    pool = rng.permutation(10**6).astype(np.float32)  # distinct values, so the k smallest are unambiguous
    next_id = 0
    for width in (3, 1, 12, 7, 30, 2):
        rows = np.sort(rng.choice(n, size=rng.integers(1, n + 1), replace=False))
        ids = np.arange(next_id, next_id + len(rows) * width).reshape(len(rows), width)
        values = pool[ids]
        next_id += values.size
        heap.add_result(torch.from_numpy(values), torch.from_numpy(ids), rows=torch.from_numpy(rows))
        for r, v, i in zip(rows, values, ids):
            offered[r] += list(zip(v.tolist(), i.tolist()))
        for r in range(n):  # every value offered and not kept is >= worst()
            kept = set(heap.I[r].tolist())
            left_out = [v for v, i in offered[r] if i not in kept]
            assert all(v >= heap.worst()[r] for v in left_out)
    values, ids = heap.finalize()
    for r in range(n):
        best = sorted(offered[r])[:k]
        best += [(float("inf"), -1)] * (k - len(best))  # rows offered fewer than k values keep empty slots
        assert values[r].tolist() == [v for v, _ in best]
        assert ids[r].tolist() == [i for _, i in best]


def test_result_heap_finalize_breaks_ties_towards_the_lower_id():
    heap = ResultHeap(1, 3)
    heap.add_result(torch.tensor([[2.0, 1.0, 2.0]]), torch.tensor([[9, 4, 3]]))
    assert [t.tolist() for t in heap.finalize()] == [[[1.0, 2.0, 2.0]], [[4, 3, 9]]]


def _data(kind, n, dim, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(size=(n, dim))
    elif kind == "offset":  # a large common mean: fp32 screening runs on uncentred train rows
        x = rng.normal(size=(n, dim)) + 1000.0
    elif kind == "relu_l2":  # deep-feature-like: non-negative, unit norm, low intrinsic dimension
        w = np.random.default_rng(99).normal(size=(16, dim))
        x = np.maximum(rng.normal(size=(n, 16)) @ w + 0.5, 0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:  # "far": two tight clusters far apart, the worst case for bf16 rounding of the centred rows
        mu = np.zeros(dim)
        mu[0] = 50.0
        x = np.vstack([mu + 0.5 * rng.normal(size=(n // 2, dim)), -mu + 0.5 * rng.normal(size=(n - n // 2, dim))])
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["normal", "offset", "relu_l2", "far"])
def test_screening_error_stays_within_the_certificate_bound(kind, bf16):
    # Screen every row (n_cand = all, in blocks of 70 rows): every row within squared distance d_sq of a
    # query screens (shifted for fp32) to at most d_sq + slack, for d_sq = the 5th nearest and the farthest.
    dim = 48
    t, q = _data(kind, 700, dim, 1), _data(kind, 60, dim, 2)
    c = expansion_centre(t, "train")
    t_norms, q_norms = centred_sq_norms(t, c, "train"), centred_sq_norms(q, c, "queries")
    screened = screen(q - c, q_norms, t, c, t_norms, len(t), 70, bf16=bf16)
    values = torch.empty((len(q), len(t)), dtype=torch.float64).scatter_(1, screened.heap.I, screened.heap.D.double())
    true = torch.cdist(q.double(), t.double()).square()
    if not bf16:
        qc = (q - c).double()
        values += (qc.square().sum(1) + 2 * qc @ c.double())[:, None]  # the fp32 screening shift K
    row_rounding = bf16_row_rounding(t, c, t_norms)
    if bf16:  # rounding errors of the rows: at most one bf16 unit (2^-8 relative), about half of it measured
        assert (screened.offset_max > 0).any() and (screened.offset_min <= 0).all()
        assert 0.3 * 2**-8 < row_rounding <= 2**-8
        assert (screened.query_rounding <= 2**-7 * torch.linalg.vector_norm(q - c, dim=1)).all()
    else:
        assert (screened.offset_max == 0).all() and (screened.query_rounding == 0).all()
    for d_sq in (true.max(dim=1).values, true.kthvalue(5, dim=1).values):
        if bf16:  # with the worst-case row rounding, and with the measured one
            slacks = [bf16_screening_slack(q_norms, float(t_norms.max()), d_sq, screened, dim, rho)
                      for rho in (2**-8, row_rounding)]
            assert bool((slacks[1] < slacks[0]).all())
        else:
            slacks = [fp32_screening_slack(q_norms, float(t_norms.max()), float(c.double().square().sum()), d_sq, dim)]
        within = true <= d_sq[:, None]
        for slack in slacks:
            assert bool((values <= (d_sq + slack)[:, None])[within].all())
            assert bool((values >= true - slack[:, None] - 2**-7 * true)[within].all())  # and never far below


def test_screen_masks_each_query_s_own_row_by_index():
    t = _data("normal", 40, 8, 0)
    t[7] = t[3]  # a duplicate is still a neighbour of its twin
    c = expansion_centre(t, "train")
    norms = centred_sq_norms(t, c, "train")
    rows = torch.tensor([3, 7, 20])
    for bf16 in (False, True):
        heap = screen(t[rows] - c, norms[rows], t, c, norms, 5, 6, bf16=bf16, self_rows=rows).heap
        assert not (heap.I == rows[:, None]).any()
        assert 7 in heap.I[0].tolist() and 3 in heap.I[1].tolist()
