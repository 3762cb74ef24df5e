"""Numerical kernels shared by dn2's searches: centring, tile screening, running top-k, exact re-ranking.

Every search in :mod:`dn2.search` has the same two stages. *Screening* ranks train rows for each
query by a matrix product (the expansion of ||q - t||^2 around a centre c, in fp32 or with the
centred rows rounded to bf16) and keeps the best few per query in a :class:`ResultHeap`.
*Re-ranking* (:func:`rerank`) recomputes the distances of those candidates directly in fp32,
without cancellation, so returned distances are exact for the returned rows. The functions
:func:`bf16_screening_slack` and :func:`fp32_screening_slack` bound how far a screening value can
be from the true squared distance: the exact search uses them to *certify* that no row outside
the candidates can be nearer (see :mod:`dn2.search.exact`).

All tensors are torch CPU tensors, float32 unless stated; nothing here copies the train matrix.

Example:
    >>> import torch
    >>> heap = ResultHeap(n=1, k=2)
    >>> heap.add_result(torch.tensor([[5.0, 1.0, 3.0]]), torch.tensor([[10, 11, 12]]))
    >>> heap.add_result(torch.tensor([[2.0]]), torch.tensor([[20]]))
    >>> values, ids = heap.finalize()
    >>> values.tolist(), ids.tolist()
    ([[1.0, 2.0]], [[11, 20]])
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "BF16_UNIT_ROUNDOFF", "FP32_UNIT_ROUNDOFF", "NORM_CHUNK_BYTES", "RERANK_STEP_BYTES", "SCREENING_PRECISIONS",
    "ResultHeap", "Screening", "as_matrix", "bf16_row_rounding", "bf16_screening_slack", "centred_sq_norms",
    "check_finite_norms", "check_k", "check_precision", "expansion_centre", "fp32_screening_slack", "native_bf16",
    "rerank", "rerank_step", "row_chunks", "screen", "split_bf16", "to_torch", "training_rows",
]

SCREENING_PRECISIONS = ("auto", "fp32", "bf16")
NORM_CHUNK_BYTES = 2 * 2**20  # cache-sized row chunks for the squared-norm pass and the bf16 conversion
RERANK_STEP_BYTES = 4 * 2**20  # gathered candidate rows per re-ranking step: cache-sized, not budget-sized
#   (10^4 queries, k=2: 1.5x faster than 64 MiB steps at N=1000, 1.2x at N=10^4; 2 MiB was within noise)
FP32_UNIT_ROUNDOFF = 2.0**-24  # relative error of one rounding to float32 (24 significant bits)
BF16_UNIT_ROUNDOFF = 2.0**-8  # relative error of one rounding to bfloat16 (8 significant bits)


# ------------------------------------------------------------------------------------------ input checks


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """`x` as a 2-D float32 C-contiguous array, copying only if it is not one already."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {x.shape}")
    return x


def to_torch(x: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a float32 array; read-only inputs (e.g. np.load memmaps) are fine, we never write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable"
        return torch.from_numpy(x)


def check_k(k: int, available: int, what: str) -> None:
    """ValueError unless k is an integer in [1, available]; `what` says why that is the limit."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= available:
        raise ValueError(f"k must be between 1 and {available} ({what}), got {k}")


def check_precision(precision: str) -> None:
    """ValueError unless `precision` is one of SCREENING_PRECISIONS."""
    if precision not in SCREENING_PRECISIONS:
        raise ValueError(f"precision must be one of {SCREENING_PRECISIONS}, got {precision!r}")


def native_bf16() -> bool:
    """True when the CPU has native bf16 instructions (elsewhere torch emulates bf16, many times slower)."""
    from dn2.runtime import cpu_supports_bf16  # lazy: keeps `import dn2.search` light

    return cpu_supports_bf16()


def training_rows(X: np.ndarray, nlist: int, train_rows: int | None = None) -> np.ndarray:
    """Rows to train an IVF's k-means (and PQ) on: at most train_rows (default max(64 * nlist, 20000)), a
    fixed random subset. k-means on all of 10^6 x 2048 rows would take an hour; 64 rows per list is what
    FAISS itself needs for stable centres (it warns below 39)."""
    limit = int(train_rows or max(64 * nlist, 20000))
    if len(X) <= limit:
        return X
    rows = np.sort(np.random.default_rng(0).choice(len(X), size=limit, replace=False))
    return np.ascontiguousarray(X[rows])


# ------------------------------------------------------------------------------------------ centring, norms


def row_chunks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows) slices of about NORM_CHUNK_BYTES: cache-resident temporaries when passing over a huge matrix."""
    step = max(1, NORM_CHUNK_BYTES // max(1, 4 * x.shape[1]))
    for s in range(0, x.shape[0], step):
        yield s, x[s : s + step]


def expansion_centre(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mean of up to 4096 evenly spaced rows, float32: the point distances are expanded around.

    Distances are translation invariant, and expanding around a point near the data keeps the terms
    of ||q-c||^2 - 2 (q-c).(t-c) + ||t-c||^2 small (deep features share a large mean component), so
    fewer digits cancel; any nearby point works, so a sample suffices. ValueError on NaN/inf.
    """
    centre = x[:: max(1, x.shape[0] // 4096)].to(torch.float64).mean(dim=0)
    if not bool(torch.isfinite(centre).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return centre.to(torch.float32)


def centred_sq_norms(x: torch.Tensor, centre: torch.Tensor, name: str) -> torch.Tensor:
    """Squared norms ||x_i - centre||^2 (float32), in cache-sized chunks; also the finiteness check of `x`."""
    out = torch.empty(x.shape[0], dtype=torch.float32)
    for s, c in row_chunks(x):
        out[s : s + len(c)] = torch.linalg.vector_norm(c - centre, dim=1).square_()
    check_finite_norms(out, x, name)
    return out


def check_finite_norms(norms: torch.Tensor, x: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> None:
    """ValueError naming a row if a squared norm is not finite: NaN/inf in `x`, or values too large for
    float32 distances. `rows` maps positions in `norms` to rows of `x` (None: the same order)."""
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return
    bad = int(torch.nonzero(~finite)[0, 0])
    row = bad if rows is None else int(rows[bad])
    if not bool(torch.isfinite(x[row]).all()):
        raise ValueError(f"{name} contains NaN or infinite values (row {row})")
    raise ValueError(f"{name} has values too large for float32 distances (row {row})")


def split_bf16(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write fp32 values `x` as two bf16 columns out[:, 0] + out[:, 1] (about 16 significant bits)."""
    hi = x.to(torch.bfloat16)
    out[:, 0] = hi
    out[:, 1] = x - hi.float()


# ------------------------------------------------------------------------------------------ running top-k


class ResultHeap:
    """The k smallest values seen so far in each of n rows, with their ids: one running top-k merge.

    Modelled on ``faiss.contrib.exhaustive_search``'s ``ResultHeap``: results arrive in batches, in
    any order (:meth:`add_result`), and :meth:`finalize` sorts them. Slots not filled yet hold value
    +inf and id -1. Every value that was offered and is not kept is >= :meth:`worst` (the kept values
    only ever decrease), which is what a search certificate needs.

    Attributes: ``D`` (n, k) float32 kept values, unordered until :meth:`finalize`; ``I`` (n, k) int64 ids.
    """

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.D = torch.full((n, k), float("inf"), dtype=torch.float32)
        self.I = torch.full((n, k), -1, dtype=torch.int64)

    def add_result(self, D: torch.Tensor, I: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Merge candidates D (m, j) with ids I (m, j) into rows `rows` (m distinct row numbers; None: all)."""
        kept_d, kept_i = (self.D, self.I) if rows is None else (self.D[rows], self.I[rows])
        all_d, all_i = torch.cat([kept_d, D.float()], dim=1), torch.cat([kept_i, I], dim=1)
        best_d, j = torch.topk(all_d, self.k, dim=1, largest=False, sorted=False)
        best_i = torch.gather(all_i, 1, j)
        if rows is None:
            self.D, self.I = best_d, best_i
        else:
            self.D[rows], self.I[rows] = best_d, best_i

    def worst(self) -> torch.Tensor:
        """Per row, the largest kept value (+inf until k values are kept): no value left out is below it."""
        return self.D.max(dim=1).values

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, I) sorted by ascending value in each row, equal values by ascending id; also stored in place."""
        by_id = torch.sort(self.I, dim=1, stable=True).indices
        d = torch.gather(self.D, 1, by_id)
        order = torch.sort(d, dim=1, stable=True).indices
        self.D, self.I = torch.gather(d, 1, order), torch.gather(torch.gather(self.I, 1, by_id), 1, order)
        return self.D, self.I


# ------------------------------------------------------------------------------------------ screening


@dataclass
class Screening:
    """What :func:`screen` returns: the candidates, and what the bf16 error bound needs to know.

    ``heap``: the n_cand best rows per query (:class:`ResultHeap`; ``heap.D`` the screening values).
    For bf16 screening (zeros otherwise), recorded as the rows were screened:
    ``offset_min``, ``offset_max`` (m,): the range of the offsets r subtracted from a query's values
    before the bf16 output rounding (0 for the first block, so offset_min <= 0);
    ``query_rounding`` (m,): ||bf16(-2 (q-c)) + 2 (q-c)||, the rounding error of each query row.
    """

    heap: ResultHeap
    offset_min: torch.Tensor
    offset_max: torch.Tensor
    query_rounding: torch.Tensor


def screen(
    qc: torch.Tensor,
    q_norms: torch.Tensor,
    t: torch.Tensor,
    centre: torch.Tensor,
    t_norms: torch.Tensor,
    n_cand: int,
    block_rows: int,
    *,
    bf16: bool,
    self_rows: torch.Tensor | None = None,
) -> Screening:
    """Screen one chunk of queries against all train rows, keeping the n_cand best per query.

    `qc` (m, d) are the centred queries q - c, `q_norms` their ||q-c||^2, `t` the (uncentred) train
    rows and `t_norms` their ||t-c||^2 (:func:`centred_sq_norms`). Train rows are taken `block_rows`
    at a time; each block's per-query best n_cand are merged into the heap. `self_rows` (m,) gives
    each query's own train row for leave-one-out, masked by index (exact duplicates still count).

    Screening values (``heap.D`` of the returned :class:`Screening`):
    - fp32: ||t-c||^2 - 2 (q-c).t, one addmm on the train rows in place (no copies); it differs from
      ||q-t||^2 by the per-query constant -(||q-c||^2 + 2 (q-c).c).
    - bf16: ||q-t||^2 itself, from a bf16 product of the centred rows (see the comment in the body).

    The tile buffers are allocated once and reused: a fresh 100 MB tensor per block costs about as
    much in page faults as the elementwise work on it.
    """
    m, (n_train, dim) = qc.shape[0], t.shape
    rows = min(block_rows, n_train)
    heap = ResultHeap(m, n_cand)
    offset_min, offset_max = torch.zeros(m, dtype=torch.float32), torch.zeros(m, dtype=torch.float32)
    query_rounding = torch.zeros(m, dtype=torch.float32)
    tile = None if bf16 else torch.empty(m * rows, dtype=torch.float32)
    if bf16:
        # bf16 keeps 8 significant bits; the matmul multiplies exactly and accumulates in fp32 but rounds
        # its output to bf16. Two error sources, each kept small:
        # - Output rounding. Centring (c = train mean) already makes (q-c).(t-c) of the order of the squared
        #   distances rather than of ||q||^2, but rounding -2 (q-c).(t-c) alone still needed 64+ extra
        #   candidates on the benchmark mixture. So the norms and a per-row offset r ride along as extra
        #   columns, split into hi + lo bf16 parts (16 bits):
        #     [-2(q-c) | ||q-c||^2 - r (hi, lo) | 1, 1] . [t-c | 1, 1 | ||t-c||^2 (hi, lo)] = ||q-t||^2 - r
        #   is summed in fp32 and rounded once; r is the row's current n_cand-th best value (0 until the
        #   heap is full), so the values that decide the cut are near 0 and round with a tiny absolute error.
        # - Rounding the centred rows: up to 2^-8 of each term of (q-c).(t-c) per rounded factor; measured
        #   (query_rounding here, bf16_row_rounding for the train rows), the error bound is about half the
        #   Cauchy-Schwarz worst case. The errors of the dim terms mostly cancel, so the typical error is
        #   much smaller still, but tight clusters far apart can exceed any fixed margin: see the certificate.
        q_low = torch.empty((m, dim + 4), dtype=torch.bfloat16)
        q_low[:, :dim] = qc * -2.0
        q_low[:, dim + 2 :] = 1.0
        query_rounding = torch.linalg.vector_norm(q_low[:, :dim].float() + 2.0 * qc, dim=1)
        t_low = torch.empty((rows, dim + 4), dtype=torch.bfloat16)
        t_low[:, dim : dim + 2] = 1.0
        product = torch.empty(m * rows, dtype=torch.bfloat16)
        r = torch.zeros(m, dtype=torch.float32)
    for b in range(0, n_train, block_rows):
        tb = t[b : b + block_rows]
        n = len(tb)
        if not bf16:
            block = tile[: m * n].view(m, n)
            torch.addmm(t_norms[b : b + n], qc, tb.T, alpha=-2.0, out=block)
        else:
            low = t_low[:n]
            for s, c in row_chunks(tb):
                low[s : s + len(c), :dim] = c - centre  # converts to bf16; cache-sized fp32 temporary
            split_bf16(t_norms[b : b + n], low[:, dim + 2 :])
            split_bf16(q_norms - r, q_low[:, dim : dim + 2])
            out = product[: m * n].view(m, n)
            torch.mm(q_low, low.T, out=out)
            block = out  # ranked in bf16 as computed: no fp32 copy of the tile (r is added to the winners)
        if self_rows is not None:
            cols = self_rows - b
            inside = torch.nonzero((cols >= 0) & (cols < n)).ravel()
            block[inside, cols[inside]] = float("inf")
        v, i = torch.topk(block, min(n_cand, n), dim=1, largest=False, sorted=False)
        if bf16:
            v = v.float().add_(r[:, None])
        heap.add_result(v, i.add_(b))
        if bf16:
            r = heap.worst()
            r = torch.where(torch.isfinite(r), r, 0.0)  # not full yet, or a masked (inf) self entry kept
            torch.minimum(offset_min, r, out=offset_min)
            torch.maximum(offset_max, r, out=offset_max)
    return Screening(heap, offset_min, offset_max, query_rounding)


# ------------------------------------------------------------------------------------------ error bounds


def bf16_row_rounding(t: torch.Tensor, centre: torch.Tensor, t_norms: torch.Tensor) -> float:
    """max_i ||bf16(t_i - c) - (t_i - c)|| / ||t_i - c||: the relative rounding error of the centred train
    rows in bf16 screening, at most 2^-8 and typically ~0.47 2^-8 (it halves :func:`bf16_screening_slack`).

    One pass over the rows in cache-sized chunks (about as long as converting them once to bf16).
    """
    worst = torch.zeros((), dtype=torch.float32)
    for s, c in row_chunks(t):
        centred = c - centre
        error = torch.linalg.vector_norm(centred.to(torch.bfloat16).float().sub_(centred), dim=1)
        norms = t_norms[s : s + len(c)].sqrt()
        torch.maximum(worst, torch.where(norms > 0, error / norms, 0.0).max(), out=worst)
    return float(worst)


def _gamma(dim: int) -> float:
    """A generous bound on the relative error of a float32 sum of dim + 4 products (plus a few roundings)."""
    n = dim + 8
    return 1.01 * n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def _norm_bounds(
    q_sq: torch.Tensor, t_sq_max: float, d_sq: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, T): upper bounds on ||q-c|| and on ||t-c|| of any row t within squared distance d_sq of q.

    ||t-c|| <= ||q-c|| + ||q-t||, so rows far from the centre only matter when the query is too; the
    computed float32 squared norms are enlarged by their own rounding bound.
    """
    g = _gamma(dim)
    q = torch.sqrt(q_sq.double().clamp(min=0) * (1 + g))
    t_max = torch.full_like(q, (max(t_sq_max, 0.0) * (1 + g)) ** 0.5)
    t = torch.minimum(t_max, (q + d_sq.clamp(min=0).sqrt()) * (1 + g))
    return q, t


def bf16_screening_slack(
    q_sq: torch.Tensor,
    t_sq_max: float,
    d_sq: torch.Tensor,
    screening: Screening,
    dim: int,
    row_rounding: float = BF16_UNIT_ROUNDOFF,
) -> torch.Tensor:
    """Per query (float64): a bound B such that every row t with ||q-t||^2 <= d_sq screens, in bf16, to
    a value <= d_sq + B.

    So if the largest kept screening value (the cut) exceeds d_sq + B, with d_sq at least the k-th
    exact squared distance found, no row left out is nearer than the k found: the result is certified
    exact. The terms, for Q >= ||q-c||, T >= ||t-c|| (see `_norm_bounds`), unit roundoffs u (fp32)
    and b = 2^-8 (bf16), and the rounding errors e_q of the query row (measured by :func:`screen`) and
    rho of the train rows relative to their norm (`row_rounding`: the worst case b, or measured by
    :func:`bf16_row_rounding`):
    - the rounded rows in -2 (q-c).(t-c): T (2 Q rho + |e_q| (1 + rho)) (Cauchy-Schwarz on each part);
    - the norm columns split into hi + lo bf16 (relative 2^-16), including the offsets r;
    - fp32 accumulation over dim + 4 products, the float32 norms and the centring: ~ (dim + 8) u each;
    - the output rounding to bf16 of ||q-t||^2 - r, and the fp32 addition of r back: (b + 2u) |.|.
      A value rises with the distance faster than its rounding error does, so the worst row is one at
      distance exactly d_sq, whose |d_sq - r| is at most max(d_sq - min r, max r - d_sq).
    Worst case, not typical: the rounding errors of the dim terms rarely add up.
    """
    u, b, g = FP32_UNIT_ROUNDOFF, BF16_UNIT_ROUNDOFF, _gamma(dim)
    q, t = _norm_bounds(q_sq, t_sq_max, d_sq, dim)
    d_sq = d_sq.double().clamp(min=0)
    r_min, r_max = screening.offset_min.double(), screening.offset_max.double()
    r = torch.maximum(r_min.abs(), r_max.abs())
    rho = min(row_rounding * (1 + 3 * g), b)  # if measured, enlarged by the fp32 rounding of the measurement
    e_q = torch.minimum(screening.query_rounding.double() * (1 + g), 2 * b * q)
    before_output = (
        t * (2 * q * rho + e_q * (1 + rho)) * (1 + g)  # bf16 rows in the cross term
        + 2.2 * g * q * t  # its fp32 accumulation
        + (2.0**-16 + 2 * g) * (q * q + r + t * t)  # hi + lo norm columns, their accumulation, fp32 norms
        + 3 * u * (q + t) ** 2  # centring q - c, t - c in float32
    )
    gap = torch.maximum(d_sq - r_min, r_max - d_sq).clamp(min=0)  # |d_sq - r| for any r used
    output = (b + 2 * u) * (1 + g) * (gap + before_output) + 2 * u * (d_sq + r)  # bf16 rounding, fp32 add of r
    return 1.01 * (before_output + output) + 1e-30 * dim


def fp32_screening_slack(
    q_sq: torch.Tensor, t_sq_max: float, centre_sq: float, d_sq: torch.Tensor, dim: int
) -> torch.Tensor:
    """Per query (float64): a bound B such that every row t with ||q-t||^2 <= d_sq screens, in fp32, to a
    value <= d_sq - K + B, where K = ||q-c||^2 + 2 (q-c).c is the query's shift (see :func:`screen`).

    Terms: the fp32 addmm ||t-c||^2 - 2 (q-c).t over dim + 2 terms (t uncentred: ||t|| <= T + ||c||),
    the float32 norms, and the centring: all ~ (dim + 8) u relative, u = 2^-24.
    """
    u, g = FP32_UNIT_ROUNDOFF, _gamma(dim)
    q, t = _norm_bounds(q_sq, t_sq_max, d_sq, dim)
    t_raw = t + (max(centre_sq, 0.0) * (1 + g)) ** 0.5
    bound = 1.1 * g * (t * t + 2 * q * t_raw) + g * t * t + 2.1 * u * q * t + 3 * u * (q + t) ** 2
    return 1.01 * bound + 1e-15 * (q * q + 2 * q * t_raw) + 1e-30 * dim


# ------------------------------------------------------------------------------------------ re-ranking


def rerank_step(n_cand: int, dim: int) -> int:
    """Queries per re-ranking step: their gathered candidate rows fill about RERANK_STEP_BYTES (at least one)."""
    return max(1, RERANK_STEP_BYTES // (4 * n_cand * dim))


def rerank(
    t: torch.Tensor,
    q: torch.Tensor,
    cand: torch.Tensor,
    k: int,
    step: int,
    dist_out: np.ndarray,
    idx_out: np.ndarray,
    valid: torch.Tensor | None = None,
) -> None:
    """Write the k nearest of each query row's candidates by exact fp32 ||q - t|| into dist_out / idx_out.

    Candidates are sorted by index first, then stably by distance: ties break towards the lower index.
    Rows are processed `step` at a time through one reused (step, n_cand, dim) buffer of gathered rows.
    `valid` (bool, like `cand`) marks padding candidates (False, any id, e.g. -1) that must never be
    returned: each row needs at least k valid ones.
    """
    if valid is not None:
        cand = torch.where(valid, cand, 0)
    cand, order = torch.sort(cand, dim=1)
    invalid = None if valid is None else ~torch.gather(valid, 1, order)
    m, n_cand = cand.shape
    gathered = torch.empty(min(step, m) * n_cand * t.shape[1], dtype=torch.float32)
    for r in range(0, m, step):
        c = cand[r : r + step]
        diff = gathered[: c.numel() * t.shape[1]].view(len(c), n_cand, t.shape[1])
        torch.index_select(t, 0, c.reshape(-1), out=diff.view(-1, t.shape[1]))
        diff.sub_(q[r : r + len(c), None, :])  # float32 differences carry no cancellation error
        exact = torch.linalg.vector_norm(diff, dim=2)
        if invalid is not None:
            exact[invalid[r : r + len(c)]] = float("inf")
        order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
        dist_out[r : r + len(c)] = torch.gather(exact, 1, order).numpy()
        idx_out[r : r + len(c)] = torch.gather(c, 1, order).numpy()
