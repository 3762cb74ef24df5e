"""Exact k nearest neighbours: tiled screening (fp32 or bf16), exact fp32 re-ranking, and a certificate.

:func:`knn` screens candidates tile by tile with a matrix product (:func:`dn2.search.kernels.screen`),
re-ranks the best k + margin of each query by directly computed fp32 distances, and then *proves*
the result: the screening error is bounded from the norms (:func:`~dn2.search.kernels.bf16_screening_slack`,
:func:`~dn2.search.kernels.fp32_screening_slack`), and a query is certified when the cut (the
largest screening value kept; every row left out screened at or above it) exceeds the k-th exact
squared distance by more than that bound: then no row left out can be nearer. Queries that cannot
be certified (near-ties within the rounding error, e.g. bf16 on tight clusters far from the mean,
or many exact duplicates) are searched again in one fp32 pass that keeps *every* row within the
fp32 bound of their k-th distance and computes those distances directly. So the neighbours are
always the exact ones (as a brute-force search over directly computed fp32 distances would rank
them, ties towards the lower index), in either screening precision.

The bf16 bound first assumes the worst-case rounding of the train rows (2^-8 of their length); only
if that does not certify a query is the actual rounding measured, once per search
(:func:`~dn2.search.kernels.bf16_row_rounding`, about half the worst case).

Example:
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> dist, idx = knn(X, X[:3] + 0.01, k=2)
    >>> idx[:, 0].tolist()
    [0, 1, 2]
    >>> dist, idx = ExactIndex().fit(X).search_self(k=1)   # leave-one-out
    >>> bool((idx[:, 0] != np.arange(1000)).all())
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import working_memory_bytes
from .base import Param, RebuiltByFitting, check_params
from .kernels import (
    FP32_UNIT_ROUNDOFF,
    SCREENING_PRECISIONS,
    as_matrix,
    bf16_row_rounding,
    bf16_screening_slack,
    centred_sq_norms,
    check_k,
    check_precision,
    expansion_centre,
    fp32_screening_slack,
    native_bf16,
    rerank,
    rerank_step,
    screen,
    to_torch,
)

__all__ = ["ExactIndex", "knn", "pairwise_distances", "screening_precision"]

QUERY_CHUNK = 2048  # default queries per chunk: each pass over the train rows serves this many (compute bound)
TRAIN_BLOCK_BYTES = 32 * 2**20  # train rows per block, in the matmul's dtype: ~ an L3 cache (see _tile_rows)
RERANK_MARGIN = 8  # candidates beyond k re-ranked by exact distance with fp32 screening
RERANK_MARGIN_BF16 = 32  # the same for bf16 screening: its larger rounding error needs a wider cut to certify
#   (8 gave the fp32 top-k on the benchmark mixture, tight clusters far apart needed 32; each extra 8 costs ~3%)
BF16_MIN_WORK = 5 * 10**10  # n_queries * n_train * dim from which "auto" screens in bf16 (when native)


def screening_precision(precision: str, n_queries: int, n_train: int, dim: int) -> str:
    """The precision ("fp32" or "bf16") in which :func:`knn` starts screening a problem of this size.

    "auto" picks bf16 only when the CPU has native bf16 instructions (AVX-512 BF16 or AMX; elsewhere
    torch emulates bf16, many times slower) and n_queries * n_train * dim >= BF16_MIN_WORK: below
    that, converting the train rows and re-ranking the larger candidate set cost more than bf16 saves.
    Either way the result is exact (the certificate, see the module docstring); bf16 only changes the
    speed. Why "auto" keeps bf16 now that it must certify: we measured fallback counts and timings
    (numbers in BENCHMARKS.md). On L2-normalised ReLU-like synthetic features and on a sample of real
    EfficientNet features every query certified, and bf16 stayed as fast as before, well ahead of
    fp32; on the benchmark's isotropic Gaussian mixture (near-ties everywhere) the share of queries
    falling back grows with N and d, until bf16 plus the fp32 pass costs as much as fp32 alone. So
    :func:`knn` in "auto" leaves bf16 for fp32 once more than half of a chunk's queries fall back.
    """
    check_precision(precision)
    if precision != "auto":
        return precision
    if n_queries * n_train * dim < BF16_MIN_WORK:
        return "fp32"
    return "bf16" if native_bf16() else "fp32"


def _tile_rows(
    n_q: int, n_train: int, dim: int, n_cand: int, bf16: bool, chunk_size: int | None, block_rows: int | None
) -> tuple[int, int, int]:
    """(queries per chunk, train rows per block, queries per re-ranking step) keeping temporaries within
    the working memory (:func:`dn2.config.working_memory_bytes`, read at call time).

    A quarter of the budget for the query chunk (centred fp32 copy, bf16 copy, candidate lists), half
    for the (chunk x block) screening tile (fp32, or for bf16 the bf16 product and the bf16 train
    block); the gathered candidate rows of one re-ranking step stay cache-sized (RERANK_STEP_BYTES).
    Within that, a train block holds about TRAIN_BLOCK_BYTES in the matmul's dtype (4096 fp32 or
    8192 bf16 rows at dim 2048): at 2000 x 100k x 2048, fp32 blocks of 8192 rows were 15% slower,
    bf16 blocks of 4096 3% slower. Explicit chunk_size / block_rows override the first two (and can
    exceed the budget); so can a huge dim or k, each step holding at least one row. Nothing scales
    with the number of train rows: the train matrix is never copied, in either precision.
    """
    budget = working_memory_bytes()
    per_query = dim * (6 if bf16 else 4) + 48 * n_cand
    q_rows = chunk_size or max(1, min(QUERY_CHUNK, n_q, budget // 4 // per_query))
    row_bytes = 2 * (dim + 4) if bf16 else 4 * dim
    per_train = q_rows * (2 if bf16 else 4) + (row_bytes if bf16 else 0)
    t_rows = block_rows or max(1, min(n_train, TRAIN_BLOCK_BYTES // row_bytes, budget // 2 // per_train))
    return q_rows, t_rows, min(q_rows, rerank_step(n_cand, dim))


def _sq_upper(dist: np.ndarray, dim: int) -> torch.Tensor:
    """Upper bounds (float64) on the true squared distances of fp32 distances computed by `rerank`
    (float32 differences, a sum of dim squares and a square root: relative error < (dim + 8) 2^-24)."""
    d = torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)).double()
    return d * d * (1 + 2.02 * (dim + 8) * FP32_UNIT_ROUNDOFF) + 1e-38


def _shift(qc: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """K = ||q-c||^2 + 2 (q-c).c in float64: fp32 screening values + K ~ ||q-t||^2 (see kernels.screen)."""
    q64 = qc.double()
    return q64.square().sum(dim=1) + 2.0 * (q64 @ centre.double())


@torch.inference_mode()
def _search_in_range(
    t: torch.Tensor,
    t_norms: torch.Tensor,
    centre: torch.Tensor,
    q: torch.Tensor,
    self_rows: torch.Tensor | None,
    d_sq: torch.Tensor,
    k: int,
    q_rows: int,
    t_rows: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest of each query among all train rows within squared distance d_sq (float64, per query,
    at least the k-th nearest squared distance): one fp32 screening pass keeps every row whose screening
    value is within :func:`fp32_screening_slack` of d_sq, and their distances are computed directly.

    Complete by construction, whatever the ties: the kept set holds every row within d_sq. Results are
    ranked by (fp32 distance, index) through int64 keys (the bits of a non-negative float32 sort like the
    float), merged block by block, so memory stays within one tile plus k pairs per query.
    """
    n_q, dim = q.shape
    t_sq_max, centre_sq = float(t_norms.max()), float(centre.double().square().sum())
    dist_out, idx_out = np.empty((n_q, k), np.float32), np.empty((n_q, k), np.int64)
    step = rerank_step(1, dim)
    for s in range(0, n_q, q_rows):
        qs = q[s : s + q_rows]
        m = len(qs)
        qc = qs - centre
        q_sq = torch.linalg.vector_norm(qc, dim=1).square()
        d = d_sq[s : s + m]
        limit = d - _shift(qc, centre) + fp32_screening_slack(q_sq, t_sq_max, centre_sq, d, dim)
        thr = limit.float()
        thr = torch.where(thr.double() < limit, torch.nextafter(thr, torch.tensor(float("inf"))), thr)
        own = None if self_rows is None else self_rows[s : s + m]
        kept_q = torch.empty(0, dtype=torch.int64)  # running (query, key) pairs, at most k per query
        kept = torch.empty(0, dtype=torch.int64)
        tile = torch.empty(m * min(t_rows, len(t)), dtype=torch.float32)
        for b in range(0, len(t), t_rows):
            tb = t[b : b + t_rows]
            vals = tile[: m * len(tb)].view(m, len(tb))
            torch.addmm(t_norms[b : b + len(tb)], qc, tb.T, alpha=-2.0, out=vals)
            qi, ti = torch.nonzero(vals <= thr[:, None], as_tuple=True)
            if own is not None:
                qi, ti = qi[ti + b != own[qi]], ti[ti + b != own[qi]]
            if len(qi) == 0:
                continue
            dist = torch.empty(len(qi), dtype=torch.float32)
            for p in range(0, len(qi), step):
                rows = t.index_select(0, ti[p : p + step] + b).sub_(qs.index_select(0, qi[p : p + step]))
                dist[p : p + step] = torch.linalg.vector_norm(rows, dim=1)
            keys = (dist.view(torch.int32).to(torch.int64) << 32) | (ti + b)
            kept_q, kept = torch.cat([kept_q, qi]), torch.cat([kept, keys])
            order = torch.sort(kept, stable=True).indices
            kept_q, kept = kept_q[order], kept[order]
            order = torch.sort(kept_q, stable=True).indices  # by query, each query's keys ascending
            kept_q, kept = kept_q[order], kept[order]
            rank = torch.arange(len(kept_q)) - torch.searchsorted(kept_q, kept_q)
            kept_q, kept = kept_q[rank < k], kept[rank < k]
        if len(kept) != m * k:  # cannot happen: each query's own k re-ranked rows are within d_sq
            raise RuntimeError("exact search: the fp32 range pass found fewer than k rows for a query")
        keys = kept.view(m, k)
        dist_out[s : s + m] = (keys >> 32).to(torch.int32).view(torch.float32).numpy()
        idx_out[s : s + m] = (keys & 0xFFFFFFFF).numpy()
    return dist_out, idx_out


@torch.inference_mode()
def knn(
    train: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    block_rows: int | None = None,
    precision: str = "auto",
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in `train`: (dist (Nq,k) float32 ascending, idx (Nq,k) int64).

    `queries=None` searches train against itself; with `exclude_self=True` row i never returns index i
    (leave-one-out, masked by index so exact duplicates still count).

    Work is tiled over chunks of `chunk_size` queries (default up to QUERY_CHUNK) and blocks of
    `block_rows` train rows (default: sized from the working memory, :mod:`dn2.config`): each pass over
    the train matrix serves a whole query chunk, and temporaries stay within the working memory whatever
    N (the outputs come on top; the train matrix is never copied, in either precision).

    `precision` is the screening precision: "fp32" (margin RERANK_MARGIN), "bf16" (centred rows rounded
    to bf16, margin RERANK_MARGIN_BF16) or "auto" (:func:`screening_precision`; from bf16, switches to
    fp32 for the remaining chunks once more than half of a chunk's queries could not be certified).
    The result is exact in every precision: the returned distances are the fp32 distances of the
    returned indices, ascending, and the indices are the true k nearest (ties towards the lower index),
    each query's screening being certified or, failing that, redone in an exhaustive fp32 pass (see the
    module docstring). `stats`, if given, is filled with counters: "precision" ("fp32", "bf16" or
    "bf16+fp32" after a switch), "queries", and "uncertified" (queries searched again in fp32).
    """
    self_search = queries is None or queries is train
    if exclude_self and not self_search:
        raise ValueError("exclude_self=True is leave-one-out over train: pass queries=None")
    check_precision(precision)
    train = as_matrix(train, "train")
    if train.shape[0] == 0:
        raise ValueError("train is empty")
    q_np = train if self_search else as_matrix(queries, "queries")
    if q_np.shape[1] != train.shape[1]:
        raise ValueError(f"queries have {q_np.shape[1]} features but train has {train.shape[1]}")
    n_train, dim = train.shape
    available = n_train - 1 if exclude_self else n_train
    check_k(k, available, "leave-one-out needs k <= Ntrain - 1" if exclude_self else "k <= Ntrain")
    for name, value in (("chunk_size", chunk_size), ("block_rows", block_rows)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    t = to_torch(train)
    centre = expansion_centre(t, "train")
    t_norms = centred_sq_norms(t, centre, "train")
    q = t if self_search else to_torch(q_np)
    q_norms = t_norms if self_search else centred_sq_norms(q, centre, "queries")

    n_q = q.shape[0]
    bf16 = screening_precision(precision, n_q, n_train, dim) == "bf16"
    used = "bf16" if bf16 else "fp32"
    t_sq_max, centre_sq = float(t_norms.max()), float(centre.double().square().sum())
    row_rounding = None  # measured on demand: bf16_row_rounding

    dist_out = np.empty((n_q, k), dtype=np.float32)
    idx_out = np.empty((n_q, k), dtype=np.int64)
    uncertified = []
    s = 0
    while s < n_q:
        n_cand = min(available, k + (RERANK_MARGIN_BF16 if bf16 else RERANK_MARGIN))
        q_rows, t_rows, r_rows = _tile_rows(n_q - s, n_train, dim, n_cand, bf16, chunk_size, block_rows)
        e = min(s + q_rows, n_q)
        qc = q[s:e] - centre
        own = torch.arange(s, e) if exclude_self else None
        screened = screen(qc, q_norms[s:e], t, centre, t_norms, n_cand, t_rows, bf16=bf16, self_rows=own)
        rerank(t, q[s:e], screened.heap.I, k, r_rows, dist_out[s:e], idx_out[s:e])
        if n_cand < available:  # else every row (but the query itself) was re-ranked: nothing left out
            # The certificate: every row left out screened >= cut, so none can be nearer than the k-th found
            # if cut exceeds the k-th squared distance by more than the screening error bound.
            d_sq = _sq_upper(dist_out[s:e, k - 1], dim)
            cut = screened.heap.worst().double()
            if bf16:
                ok = cut > d_sq + bf16_screening_slack(q_norms[s:e], t_sq_max, d_sq, screened, dim)
                if not ok.all():  # the worst-case rounding of the train rows did not do: measure it (once)
                    if row_rounding is None:
                        row_rounding = bf16_row_rounding(t, centre, t_norms)
                    ok = cut > d_sq + bf16_screening_slack(q_norms[s:e], t_sq_max, d_sq, screened, dim, row_rounding)
            else:
                slack = fp32_screening_slack(q_norms[s:e], t_sq_max, centre_sq, d_sq, dim)
                ok = cut + _shift(qc, centre) > d_sq + slack
            uncertified.append(torch.nonzero(~ok).ravel() + s)
            if bf16 and precision == "auto" and 2 * len(uncertified[-1]) > e - s:
                bf16, used = False, "bf16+fp32"  # bf16 stopped paying on this data: fp32 for the rest
        s = e

    redo = torch.cat(uncertified) if uncertified else torch.empty(0, dtype=torch.int64)
    if len(redo):
        rows = redo.numpy()
        d_sq = _sq_upper(dist_out[rows, k - 1], dim)
        q_rows, t_rows, _ = _tile_rows(len(rows), n_train, dim, k, False, chunk_size, block_rows)
        dist_out[rows], idx_out[rows] = _search_in_range(
            t, t_norms, centre, q.index_select(0, redo), redo if exclude_self else None, d_sq, k, q_rows, t_rows
        )
    if stats is not None:
        stats.update(precision=used, queries=n_q, uncertified=len(redo))
    return dist_out, idx_out


class ExactIndex(RebuiltByFitting):
    """Exact search via :func:`knn` (query chunk size, screening precision); keeps a reference to the fitted array.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
        >>> index = ExactIndex(precision="fp32").fit(X)
        >>> index.search(X[:2], k=1)[1].ravel().tolist(), index.state()
        ([0, 1], {})
    """

    kind = "exact"
    PARAMS: dict[str, Param] = {
        "chunk_size": Param(int, low=1, allow_none=True, doc="queries per chunk (default: from the working memory)"),
        "precision": Param(str, options=SCREENING_PRECISIONS, doc="screening precision; the result is exact in each"),
    }

    def __init__(self, chunk_size: int | None = None, precision: str = "auto") -> None:
        check_params(self.kind, self.PARAMS, {"chunk_size": chunk_size, "precision": precision})
        self.chunk_size = chunk_size
        self.precision = precision
        self._X: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The construction parameters."""
        return {"chunk_size": self.chunk_size, "precision": self.precision}

    @property
    def ntotal(self) -> int:
        """Number of indexed rows (0 before fit)."""
        return 0 if self._X is None else len(self._X)

    def fit(self, X: np.ndarray) -> ExactIndex:
        """Keep a reference to X (float32, not copied if it already is): nothing to precompute."""
        X = as_matrix(X, "X")
        if len(X) == 0:
            raise ValueError("cannot fit an index on an empty array")
        self._X = X
        return self

    def _fitted(self) -> np.ndarray:
        if self._X is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        return self._X

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact k nearest rows of each query (:func:`knn`)."""
        return knn(self._fitted(), Q, k, chunk_size=self.chunk_size, precision=self.precision)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out: the exact k nearest other rows of each indexed row."""
        return knn(self._fitted(), None, k, exclude_self=True, chunk_size=self.chunk_size, precision=self.precision)



@torch.inference_mode()
def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The full Euclidean distance block (len(a), len(b)), float32, for callers that need every distance
    (the benchmark protocols score many training subsets from one block). Expanded around ``b``'s mean,
    as :func:`knn` does, so deep features' large shared component cancels before the products.

    Example:
        >>> pairwise_distances(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [0.0, 1.0]])).round(4).tolist()
        [[5.0, 1.0]]
    """
    ta, tb = to_torch(as_matrix(a, "a")), to_torch(as_matrix(b, "b"))
    if ta.shape[1] != tb.shape[1]:
        raise ValueError(f"a has {ta.shape[1]} features but b has {tb.shape[1]}")
    centre = tb.mean(dim=0, dtype=torch.float64).to(torch.float32)
    ta, tb = ta - centre, tb - centre
    d2 = (ta @ tb.T).mul_(-2.0)
    d2.add_(ta.square().sum(1)[:, None]).add_(tb.square().sum(1)[None, :]).clamp_(min=0.0)
    return d2.sqrt_().numpy()
