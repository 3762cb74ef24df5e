"""Approximate kNN by an inverted file (IVF), searched cell by cell with one matrix product per cell.

The training rows are split into ``nlist`` cells by k-means; a query visits the ``nprobe`` cells whose
centres are nearest. FAISS' IndexIVFFlat scans each (query, cell) pair on its own, which reads the
cell from memory once per query: at 10^6 x 2048 float32 rows that is memory bound and hardly faster
than dn2's exact search (BENCHMARKS.md). Here all queries that visit a cell are gathered and screened
against it with one matrix product (compute bound, bf16 on CPUs with native bf16), the cells' rows
stored as residuals to their centre, each query's candidates merged across its cells in one
:class:`~dn2.search.kernels.ResultHeap`. The best k + margin candidates of each query are then
re-ranked by exact fp32 distances on the original rows (:func:`~dn2.search.kernels.rerank`):
returned distances are exact for the returned indices; which rows are found is approximate
(recall_at_k), as the name says, so there is no certificate here.

Example:
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
    >>> index = IvfIndex(nlist=50, nprobe=8).fit(X)
    >>> dist, idx = index.search(X[:3], k=2)
    >>> idx[:, 0].tolist()
    [0, 1, 2]
    >>> restored = IvfIndex(nlist=50, nprobe=8).restore(X, index.state())   # no k-means again
    >>> bool((restored.search(X[:3], k=2)[1] == idx).all())
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from ..config import working_memory_bytes
from .base import Param, check_params, leave_one_out
from .cluster import kmeans
from .exact import RERANK_MARGIN, RERANK_MARGIN_BF16, knn
from .kernels import (
    SCREENING_PRECISIONS,
    ResultHeap,
    as_matrix,
    check_finite_norms,
    check_k,
    native_bf16,
    rerank,
    rerank_step,
    split_bf16,
    to_torch,
    training_rows,
)

__all__ = ["IvfIndex", "default_nlist"]

QUERY_CHUNK = 16384  # queries searched together (at most): ~260 visitors per cell at nprobe 16 and 1000 cells
QUERY_GROUP = 1024  # queries of one cell screened per matrix product
CELL_BLOCK = 8192  # rows of one cell per matrix product (a huge cell is taken in blocks)
STATE_KEYS = ("centres", "offsets", "order")


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
    t = to_torch(X)
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
    reference to the fitted array (used for the exact re-ranking); a search adds the candidate lists
    of up to QUERY_CHUNK queries at a time (fewer if the working memory, :mod:`dn2.config`, is small).

    State (:meth:`state`, for model files): "centres" (nlist, d) float32 k-means centres, "order" (N,)
    int64 the rows sorted by cell, "offsets" (nlist + 1,) int64 where each cell starts in "order".
    """

    kind = "ivf"
    PARAMS: dict[str, Param] = {
        "nlist": Param(int, low=1, allow_none=True, doc="k-means cells (default ~sqrt(N))"),
        "nprobe": Param(int, low=1, doc="cells visited per query"),
        "train_rows": Param(int, low=1, allow_none=True, doc="rows k-means trains on (default max(64 nlist, 20000))"),
        "precision": Param(str, options=SCREENING_PRECISIONS, doc="screening precision (re-ranking is fp32)"),
    }

    def __init__(self, nlist: int | None = None, nprobe: int = 16, train_rows: int | None = None,
                 precision: str = "auto") -> None:
        check_params(self.kind, self.PARAMS,
                     {"nlist": nlist, "nprobe": nprobe, "train_rows": train_rows, "precision": precision})
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_rows = train_rows
        self.precision = precision
        self._X: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The construction parameters."""
        return {"nlist": self.nlist, "nprobe": self.nprobe, "train_rows": self.train_rows, "precision": self.precision}

    @property
    def ntotal(self) -> int:
        """Number of indexed rows (0 before fit)."""
        return 0 if self._X is None else len(self._X)

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, X: np.ndarray) -> IvfIndex:
        """k-means on a sample, every row assigned to its nearest centre, residuals stored cell by cell."""
        X = as_matrix(X, "X")
        n = len(X)
        if n == 0:
            raise ValueError("cannot fit an index on an empty array")
        nlist = self.nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(f"nlist must be between 1 and the number of training rows ({n}), got {nlist}")
        centres = kmeans(training_rows(X, nlist, self.train_rows), nlist)  # NaN/inf in the sample: raises
        bf16 = self._bf16()
        assign = _nearest_centres(X, centres, 1, bf16)[:, 0]
        order = np.argsort(assign, kind="stable")
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(assign, minlength=nlist), out=offsets[1:])
        return self._store(X, centres, order, offsets, bf16)

    def _bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and native_bf16())

    def _store(
        self, X: np.ndarray, centres: np.ndarray, order: np.ndarray, offsets: np.ndarray, bf16: bool
    ) -> IvfIndex:
        """Residuals of every row to its cell's centre, cell by cell, in the screening dtype (+ squared norms)."""
        n, dim = X.shape
        t = to_torch(X)
        c = torch.from_numpy(centres)
        store = torch.empty((n, dim + 4 if bf16 else dim), dtype=torch.bfloat16 if bf16 else torch.float32)
        norms = torch.empty(n, dtype=torch.float32)
        order_t = torch.from_numpy(order)
        for lst in range(len(centres)):
            a, b = int(offsets[lst]), int(offsets[lst + 1])
            for s in range(a, b, CELL_BLOCK):  # bounded fp32 temporaries
                e = min(s + CELL_BLOCK, b)
                res = t.index_select(0, order_t[s:e]) - c[lst]
                norms[s:e] = torch.linalg.vector_norm(res, dim=1).square_()
                store[s:e, :dim] = res
        check_finite_norms(norms, t, "X", rows=order_t)  # NaN/inf rows anywhere (k-means checked its sample)
        if bf16:  # [t - c | 1, 1 | ||t - c||^2 (hi, lo)], as in dn2.search.kernels.screen
            store[:, dim : dim + 2] = 1.0
            split_bf16(norms, store[:, dim + 2 :])
        self._X, self.bf16_, self.centres_, self.order_, self.offsets_ = X, bf16, centres, order_t, offsets
        self.store_, self.norms_ = store, norms
        return self

    # ------------------------------------------------------------------------------------------ state

    def state(self) -> dict[str, np.ndarray]:
        """The k-means centres and the cell of every row (see the class docstring): restore needs no k-means."""
        self._fitted()
        return {"centres": self.centres_, "order": self.order_.numpy(), "offsets": self.offsets_}

    def restore(self, X: np.ndarray, state: Mapping[str, np.ndarray]) -> IvfIndex:
        """Rebuild the fitted index from the data and :meth:`state`, checking the arrays (they may come from a file)."""
        X = as_matrix(X, "X")
        n, dim = X.shape
        if set(state) != set(STATE_KEYS):
            raise ValueError(f"ivf state must hold arrays {sorted(STATE_KEYS)}, got {sorted(state)}")
        centres = np.ascontiguousarray(state["centres"])
        order, offsets = np.asarray(state["order"]), np.asarray(state["offsets"])
        if centres.dtype != np.float32 or centres.ndim != 2 or centres.shape[1] != dim or len(centres) == 0:
            raise ValueError(f"ivf state: centres must be float32 (nlist, {dim}), got {centres.dtype} {centres.shape}")
        if not np.isfinite(centres).all():
            raise ValueError("ivf state: centres contain NaN or infinite values")
        if self.nlist is not None and len(centres) != self.nlist:
            raise ValueError(f"ivf state: {len(centres)} centres but nlist={self.nlist}")
        if order.dtype != np.int64 or order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"ivf state: order must be an int64 permutation of the {n} rows")
        if (offsets.dtype != np.int64 or offsets.shape != (len(centres) + 1,) or offsets[0] != 0
                or offsets[-1] != n or (np.diff(offsets) < 0).any()):
            raise ValueError(f"ivf state: offsets must be int64 (nlist + 1,), rising from 0 to {n}")
        return self._store(X, centres, np.ascontiguousarray(order), offsets.copy(), self._bf16())

    # ------------------------------------------------------------------------------------------ search

    def _fitted(self) -> np.ndarray:
        if self._X is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        return self._X

    @torch.inference_mode()
    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k nearest neighbours: (dist (Nq, k) exact fp32 ascending, idx (Nq, k) int64).

        Queries are taken up to QUERY_CHUNK at a time (bounded memory, e.g. for the leave-one-out search
        of 10^6 training rows); within a chunk every visited cell is screened once for all its visitors.
        """
        X = self._fitted()
        Q = as_matrix(Q, "queries")
        if Q.shape[1] != X.shape[1]:
            raise ValueError(f"queries have {Q.shape[1]} features but the index has {X.shape[1]}")
        check_k(k, len(X), "k <= ntotal")
        n_cand = min(len(X), k + (RERANK_MARGIN_BF16 if self.bf16_ else RERANK_MARGIN))
        per_query = 48 * n_cand + 16 * min(self.nprobe, len(self.centres_))  # candidate heap, merges, probes
        chunk = max(1, min(QUERY_CHUNK, working_memory_bytes() // 2 // per_query))
        dist = np.empty((len(Q), k), dtype=np.float32)
        idx = np.empty((len(Q), k), dtype=np.int64)
        for s in range(0, len(Q), chunk):
            e = min(s + chunk, len(Q))
            if not np.isfinite(Q[s:e]).all():
                raise ValueError("queries contain NaN or infinite values")
            self._search_chunk(Q[s:e], k, n_cand, dist[s:e], idx[s:e])
        return dist, idx

    def _search_chunk(self, Q: np.ndarray, k: int, n_cand: int, dist: np.ndarray, idx: np.ndarray) -> None:
        """search() of one chunk of queries, written into dist / idx."""
        X = self._X
        n_q, nlist = len(Q), len(self.centres_)
        nprobe = min(self.nprobe, nlist)
        probe = _nearest_centres(Q, self.centres_, nprobe, bf16=False)  # (n_q, nprobe) cells to visit

        # Every (query, probed cell) pair, grouped by cell; each cell screened once for all its visitors.
        heap = ResultHeap(n_q, n_cand)
        pairs = np.argsort(probe.reshape(-1), kind="stable")  # pair p = query p // nprobe
        bounds = np.searchsorted(probe.reshape(-1)[pairs], np.arange(nlist + 1))
        q = to_torch(Q)
        for lst in np.nonzero(np.diff(bounds))[0]:
            a, b = int(self.offsets_[lst]), int(self.offsets_[lst + 1])
            if a == b:
                continue
            centre = torch.from_numpy(self.centres_[lst])
            for g in range(int(bounds[lst]), int(bounds[lst + 1]), QUERY_GROUP):
                visitors = torch.from_numpy(pairs[g : min(g + QUERY_GROUP, int(bounds[lst + 1]))] // nprobe)
                self._screen_cell(q.index_select(0, visitors) - centre, a, b, heap, visitors)

        # The exact re-ranking on the original rows; +inf slots pad cells with fewer than n_cand rows.
        found = np.diff(self.offsets_)[probe].sum(axis=1) >= k
        if found.any():
            rows = np.nonzero(found)[0]
            sel = torch.from_numpy(rows)
            vals, cands = heap.D.index_select(0, sel), heap.I.index_select(0, sel)
            d_f, i_f = dist[rows], idx[rows]
            step = rerank_step(cands.shape[1], Q.shape[1])
            rerank(to_torch(X), q.index_select(0, sel), cands, k, step, d_f, i_f, valid=torch.isfinite(vals))
            dist[rows], idx[rows] = d_f, i_f
        if not found.all():  # the probed cells hold fewer than k rows: search those queries exactly
            rows = np.nonzero(~found)[0]
            dist[rows], idx[rows] = knn(X, Q[rows], k)

    def _screen_cell(self, res: torch.Tensor, a: int, b: int, heap: ResultHeap, visitors: torch.Tensor) -> None:
        """Merge the best rows of cell rows a:b, by screening values ~ ||q - t||^2, into the heap rows of
        `visitors` (distinct queries), given their residuals to the cell's centre `res` (q - centre)."""
        dim = res.shape[1]
        norms = torch.linalg.vector_norm(res, dim=1).square_()
        if self.bf16_:
            q_low = torch.empty((len(res), dim + 4), dtype=torch.bfloat16)
            q_low[:, :dim] = res * -2.0
            split_bf16(norms, q_low[:, dim : dim + 2])
            q_low[:, dim + 2 :] = 1.0
        for s in range(a, b, CELL_BLOCK):
            e = min(s + CELL_BLOCK, b)
            if self.bf16_:
                vals = torch.mm(q_low, self.store_[s:e].T).float()
            else:
                vals = torch.addmm(self.norms_[s:e], res, self.store_[s:e].T, alpha=-2.0).add_(norms[:, None])
            v, i = torch.topk(vals, min(heap.k, e - s), dim=1, largest=False, sorted=False)
            heap.add_result(v, self.order_[s:e][i], rows=visitors)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out: search k+1 and drop each row's own index (or the last column if self is absent)."""
        return leave_one_out(self, self._fitted(), k)
