"""Approximate kNN by an inverted file (IVF), searched list by list with one matrix product per list.

The training rows are split into ``nlist`` cells by k-means; a query visits the ``nprobe`` cells whose
centres are nearest. FAISS' IndexIVFFlat scans each (query, cell) pair on its own, which reads the
cell from memory once per query: at 10^6 x 2048 float32 rows that is memory bound and only 1.3-1.5x faster
than dn2's exact search (BENCHMARKS.md). Here all queries that visit a cell are gathered and screened
against it with one matrix product (compute bound, bf16 on CPUs with native bf16), the cells' rows
stored as residuals to their centre. The best k + margin candidates of each query are then re-ranked
by exact fp32 distances on the original rows, as in :func:`dn2.search.knn`: returned distances are
exact for the returned indices; only which rows are found is approximate (recall_at_k).

Example:
    >>> import numpy as np
    >>> from dn2.ivf import IvfIndex
    >>> X = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
    >>> index = IvfIndex(nlist=50, nprobe=8).fit(X)
    >>> dist, idx = index.search(X[:3], k=2)
    >>> idx[:, 0].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import search as _s

__all__ = ["IvfIndex"]

_QUERY_CHUNK = 16384  # queries searched together: ~260 visitors per cell at nprobe 16 and 1000 cells
_QUERY_GROUP = 1024  # queries of one cell screened per matrix product
_CELL_BLOCK = 8192  # rows of one cell per matrix product (a huge cell is taken in blocks)


def default_nlist(n: int) -> int:
    """About sqrt(N) cells (1000 at 10^6): a cell of ~sqrt(N) rows screened against all of its visitors
    at once is a matrix product large enough to run near peak; capped at N/39 (k-means needs ~39 rows
    per centre), at least 1."""
    return max(1, min(round(math.sqrt(n)), n // 39))


@torch.inference_mode()
def _nearest_centres(X: np.ndarray, centres: np.ndarray, n: int, bf16: bool) -> np.ndarray:
    """The n nearest centres of every row (unordered), by ||c_j - m||^2 - 2 (x - m).(c_j - m), m = mean centre.

    Screening only, no exact re-ranking: a near-tie resolved the other way by rounding puts a row in
    (or sends a query to) a cell whose centre is as close, which an IVF tolerates; re-ranking 10^6 rows
    against their candidate centres would cost as much as the product itself.
    """
    c = torch.from_numpy(centres)
    m = c.mean(dim=0)
    cc = c - m
    c_norms = torch.linalg.vector_norm(cc, dim=1).square_()
    dtype = torch.bfloat16 if bf16 else torch.float32
    cc_t = cc.to(dtype).T.contiguous()
    t = _s._to_torch(X)
    out = np.empty((len(X), n), dtype=np.int64)
    for s in range(0, len(X), 4096):
        x = (t[s : s + 4096] - m).mul_(-2.0).to(dtype)
        vals = torch.mm(x, cc_t).float().add_(c_norms)
        out[s : s + len(x)] = (torch.argmin(vals, dim=1, keepdim=True) if n == 1 else
                               torch.topk(vals, n, dim=1, largest=False, sorted=False).indices).numpy()
    return out


class IvfIndex:
    """IVF-Flat kNN batched per cell; parameters as FAISS' IVF: nlist, nprobe, train_rows, plus precision.

    Args:
        nlist: number of k-means cells (default about sqrt(N), see :func:`default_nlist`).
        nprobe: cells visited per query (default 16): more is slower and finds more true neighbours.
        train_rows: rows k-means is trained on (default max(64 * nlist, 20000), a fixed random sample).
        precision: screening precision "auto" (bf16 on CPUs with native bf16, else fp32), "fp32" or
            "bf16"; candidates are always re-ranked in fp32.

    Memory: the index holds the cells' residuals in the screening dtype (half the data in bf16) and a
    reference to the fitted array (used for the exact re-ranking); a search adds about 100 MB of
    candidate lists per chunk of _QUERY_CHUNK queries, whatever their number.
    """

    kind = "ivf"

    def __init__(self, nlist: int | None = None, nprobe: int = 16, train_rows: int | None = None,
                 precision: str = "auto") -> None:
        _s._check_precision(precision)
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("train_rows", train_rows)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_rows = train_rows
        self.precision = precision
        self._X: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return 0 if self._X is None else len(self._X)

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, X: np.ndarray) -> IvfIndex:
        """k-means on a sample, every row assigned to its nearest centre, residuals stored cell by cell."""
        X = _s._as_matrix(X, "X")
        n, dim = X.shape
        if n == 0:
            raise ValueError("cannot fit an index on an empty array")
        nlist = self.nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(f"nlist must be between 1 and the number of training rows ({n}), got {nlist}")
        centres = _s.kmeans(_s._training_rows(X, nlist, self.train_rows), nlist)  # NaN/inf in the sample: raises
        self.bf16_ = self.precision == "bf16" or (self.precision == "auto" and _s._native_bf16())
        assign = _nearest_centres(X, centres, 1, self.bf16_)[:, 0]
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=nlist)
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])

        t = _s._to_torch(X)
        c = torch.from_numpy(centres)
        width = dim + 4 if self.bf16_ else dim
        store = torch.empty((n, width), dtype=torch.bfloat16 if self.bf16_ else torch.float32)
        norms = torch.empty(n, dtype=torch.float32)
        order_t = torch.from_numpy(order)
        for lst in range(nlist):
            a, b = int(offsets[lst]), int(offsets[lst + 1])
            for s in range(a, b, _CELL_BLOCK):  # bounded fp32 temporaries
                e = min(s + _CELL_BLOCK, b)
                res = t.index_select(0, order_t[s:e]) - c[lst]
                norms[s:e] = torch.linalg.vector_norm(res, dim=1).square_()
                store[s:e, :dim] = res
        _s._check_finite_norms(norms, t, "X", rows=order_t)  # NaN/inf rows anywhere (the sample was checked)
        if self.bf16_:  # [t - c | 1, 1 | ||t - c||^2 (hi, lo)], see dn2.search._screen
            store[:, dim : dim + 2] = 1.0
            _s._split_bf16(norms, store[:, dim + 2 :])
        self._X, self.centres_, self.order_, self.offsets_ = X, centres, order_t, offsets
        self.store_, self.norms_ = store, norms
        return self

    # ------------------------------------------------------------------------------------------ search

    def _fitted(self) -> np.ndarray:
        if self._X is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        return self._X

    @torch.inference_mode()
    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k nearest neighbours: (dist (Nq, k) exact fp32 ascending, idx (Nq, k) int64).

        Queries are taken _QUERY_CHUNK at a time (bounded memory, e.g. for the leave-one-out search of
        10^6 training rows); within a chunk every visited cell is screened once for all its visitors.
        """
        X = self._fitted()
        Q = _s._as_matrix(Q, "queries")
        if Q.shape[1] != X.shape[1]:
            raise ValueError(f"queries have {Q.shape[1]} features but the index has {X.shape[1]}")
        _s._check_k(k, len(X), "k <= ntotal")
        dist = np.empty((len(Q), k), dtype=np.float32)
        idx = np.empty((len(Q), k), dtype=np.int64)
        for s in range(0, len(Q), _QUERY_CHUNK):
            e = min(s + _QUERY_CHUNK, len(Q))
            if not np.isfinite(Q[s:e]).all():
                raise ValueError("queries contain NaN or infinite values")
            self._search_chunk(Q[s:e], k, dist[s:e], idx[s:e])
        return dist, idx

    def _search_chunk(self, Q: np.ndarray, k: int, dist: np.ndarray, idx: np.ndarray) -> None:
        """search() of one chunk of queries, written into dist / idx."""
        X = self._X
        n_q, nlist = len(Q), len(self.centres_)
        nprobe = min(self.nprobe, nlist)
        n_cand = min(len(X), k + (_s._RERANK_MARGIN_BF16 if self.bf16_ else _s._RERANK_MARGIN))
        probe = _nearest_centres(Q, self.centres_, nprobe, bf16=False)  # (n_q, nprobe) cells to visit

        # Candidates of every (query, probed cell) pair: (n_q, nprobe, n_cand) screening values and rows.
        cand_v = torch.full((n_q, nprobe, n_cand), float("inf"))
        cand_i = torch.zeros((n_q, nprobe, n_cand), dtype=torch.int64)
        pairs = np.argsort(probe.reshape(-1), kind="stable")  # pair p = query p // nprobe, slot p % nprobe
        bounds = np.searchsorted(probe.reshape(-1)[pairs], np.arange(nlist + 1))
        q = _s._to_torch(Q)
        flat_v, flat_i = cand_v.view(-1, n_cand), cand_i.view(-1, n_cand)
        for lst in np.nonzero(np.diff(bounds))[0]:
            a, b = int(self.offsets_[lst]), int(self.offsets_[lst + 1])
            if a == b:
                continue
            centre = torch.from_numpy(self.centres_[lst])
            for g in range(int(bounds[lst]), int(bounds[lst + 1]), _QUERY_GROUP):
                p = torch.from_numpy(pairs[g : min(g + _QUERY_GROUP, int(bounds[lst + 1]))])
                v, i = self._screen_cell(q.index_select(0, p // nprobe) - centre, a, b, n_cand)
                flat_v[p, : v.shape[1]] = v
                flat_i[p, : v.shape[1]] = i

        # Best n_cand over the probed cells, then the exact re-ranking on the original rows.
        cand_v, cand_i = cand_v.view(n_q, -1), cand_i.view(n_q, -1)
        best_v, j = torch.topk(cand_v, min(n_cand, cand_v.shape[1]), dim=1, largest=False, sorted=False)
        best_i = torch.gather(cand_i, 1, j)
        found = np.diff(self.offsets_)[probe].sum(axis=1) >= k
        if found.any():
            rows = np.nonzero(found)[0]
            sel = torch.from_numpy(rows)
            vals, cands = best_v.index_select(0, sel), best_i.index_select(0, sel)
            d_f, i_f = dist[rows], idx[rows]  # +inf slots: padding of cells with fewer than n_cand rows
            step = _s._rerank_step(cands.shape[1], Q.shape[1])
            _s._rerank(_s._to_torch(X), q.index_select(0, sel), cands, k, step, d_f, i_f, valid=torch.isfinite(vals))
            dist[rows], idx[rows] = d_f, i_f
        if not found.all():  # the probed cells hold fewer than k rows: search those queries exactly
            rows = np.nonzero(~found)[0]
            dist[rows], idx[rows] = _s.knn(X, Q[rows], k)

    def _screen_cell(self, res: torch.Tensor, a: int, b: int, n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Screening values ~ ||q - t||^2 and row indices of the best n_cand rows of cell rows a:b per query
        residual row (q - centre)."""
        dim = res.shape[1]
        norms = torch.linalg.vector_norm(res, dim=1).square_()
        if self.bf16_:
            q_low = torch.empty((len(res), dim + 4), dtype=torch.bfloat16)
            q_low[:, :dim] = res * -2.0
            _s._split_bf16(norms, q_low[:, dim : dim + 2])
            q_low[:, dim + 2 :] = 1.0
        best_v = torch.empty((len(res), 0))
        best_i = torch.empty((len(res), 0), dtype=torch.int64)
        for s in range(a, b, _CELL_BLOCK):
            e = min(s + _CELL_BLOCK, b)
            if self.bf16_:
                vals = torch.mm(q_low, self.store_[s:e].T).float()
            else:
                vals = torch.addmm(self.norms_[s:e], res, self.store_[s:e].T, alpha=-2.0).add_(norms[:, None])
            v, i = torch.topk(vals, min(n_cand, e - s), dim=1, largest=False, sorted=False)
            best_v = torch.cat([best_v, v], dim=1)
            best_i = torch.cat([best_i, self.order_[s:e][i]], dim=1)
            if best_v.shape[1] > n_cand:
                best_v, j = torch.topk(best_v, n_cand, dim=1, largest=False, sorted=False)
                best_i = torch.gather(best_i, 1, j)
        return best_v, best_i

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out: search k+1 and drop each row's own index (or the last column if self is absent)."""
        return _s._leave_one_out(self, self._fitted(), k)
