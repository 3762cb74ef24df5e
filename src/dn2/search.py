"""Nearest-neighbour search for DN2: exact tiled kNN (torch), FAISS indexes, k-means compression.

All arrays are float32; every distance returned is Euclidean (never squared). The exact search
(:func:`knn`) screens candidates with a matrix product in fp32 or, on CPUs with native bf16
instructions, in bf16, then re-ranks them by directly computed fp32 distances: returned distances are
always exact for the returned indices.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
    faiss = None

__all__ = [
    "knn", "knn_score", "kmeans", "make_index", "recall_at_k", "screening_precision", "ExactIndex", "FaissIndex",
    "INDEX_KINDS", "SCREENING_PRECISIONS",
]

MEMORY_BUDGET = 256 * 2**20  # bytes of temporaries of the exact path (see _tile_rows), whatever the data size
QUERY_CHUNK = 2048  # default queries per chunk: each pass over the train rows serves this many (compute bound)
SCREENING_PRECISIONS = ("auto", "fp32", "bf16")
_NORM_CHUNK_BYTES = 2 * 2**20  # cache-sized row chunks for the squared-norm pass and the bf16 conversion
_RERANK_STEP_BYTES = 4 * 2**20  # gathered candidate rows per re-ranking step: cache-sized, not budget-sized
#   (10^4 queries, k=2: 1.5x faster than 64 MiB steps at N=1000, 1.2x at N=10^4; 2 MiB was within noise)
_TRAIN_BLOCK_BYTES = 32 * 2**20  # train rows per block, in the matmul's dtype: ~ an L3 cache (see _tile_rows)
_RERANK_MARGIN = 8  # candidates beyond k re-ranked by exact distance (near-ties, rounding of the expansion)
_RERANK_MARGIN_BF16 = 32  # the same for bf16 screening (see _screen): 8 gave the fp32 top-k on the benchmark
#   mixture and on L2-normalised ReLU-like data (d = 2048, N <= 10^5, k = 2 and 10), but tight clusters far
#   apart needed 32 (recall 0.9988 at 16); each extra 8 costs ~3%, a price worth paying for the default path
_BF16_MIN_WORK = 5 * 10**10  # n_queries * n_train * dim from which "auto" screens in bf16 (when native)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """Return `x` as a 2-D float32 C-contiguous array, copying only if it is not one already."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {x.shape}")
    return x


def _to_torch(x: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a float32 array; read-only inputs (e.g. np.load memmaps) are fine, we never write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable"
        return torch.from_numpy(x)


def _row_chunks(x: torch.Tensor):
    """Row slices of about _NORM_CHUNK_BYTES: small cache-resident temporaries when passing over a huge matrix."""
    step = max(1, _NORM_CHUNK_BYTES // max(1, 4 * x.shape[1]))
    for s in range(0, x.shape[0], step):
        yield s, x[s : s + step]


def _centre(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mean of up to 4096 evenly spaced rows: any nearby point works as expansion centre, so a sample suffices."""
    centre = x[:: max(1, x.shape[0] // 4096)].to(torch.float64).mean(dim=0)
    if not bool(torch.isfinite(centre).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return centre.to(torch.float32)


def _sq_norms(x: torch.Tensor, centre: torch.Tensor, name: str) -> torch.Tensor:
    """Squared norms of the centred rows ||x_i - centre||^2; also the finiteness check (NaN/inf -> ValueError)."""
    out = torch.empty(x.shape[0], dtype=torch.float32)
    for s, c in _row_chunks(x):
        out[s : s + len(c)] = torch.linalg.vector_norm(c - centre, dim=1).square_()
    _check_finite_norms(out, x, name)
    return out


def _check_finite_norms(norms: torch.Tensor, x: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> None:
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


def _check_precision(precision: str) -> None:
    if precision not in SCREENING_PRECISIONS:
        raise ValueError(f"precision must be one of {SCREENING_PRECISIONS}, got {precision!r}")


def _native_bf16() -> bool:
    """True when the CPU has native bf16 instructions (elsewhere torch emulates bf16, many times slower)."""
    from . import runtime  # lazy: torch-only module, but keeps `import dn2.search` light and cycle-free

    return runtime.cpu_supports_bf16()


def _training_rows(X: np.ndarray, nlist: int, train_rows: int | None = None) -> np.ndarray:
    """Rows to train an IVF's k-means (and PQ) on: at most train_rows (default max(64 * nlist, 20000)), a
    fixed random subset. k-means on all of 10^6 x 2048 rows would take an hour; 64 rows per list is what
    FAISS itself needs for stable centres (it warns below 39)."""
    limit = int(train_rows or max(64 * nlist, 20000))
    if len(X) <= limit:
        return X
    rows = np.sort(np.random.default_rng(0).choice(len(X), size=limit, replace=False))
    return np.ascontiguousarray(X[rows])


def _check_k(k: int, available: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= available:
        raise ValueError(f"k must be between 1 and {available} ({what}), got {k}")


def screening_precision(precision: str, n_queries: int, n_train: int, dim: int) -> str:
    """The precision ("fp32" or "bf16") in which `knn` screens candidates for a problem of this size.

    "auto" picks bf16 only when the CPU has native bf16 instructions (AVX-512 BF16 or AMX; elsewhere
    torch emulates bf16, many times slower) and n_queries * n_train * dim >= _BF16_MIN_WORK: below
    that, converting the train rows and re-ranking the larger candidate set cost more than bf16
    saves (benchmarks/search.py on an AVX-512 BF16 CPU, 10^4 queries: bf16 1.1x slower than fp32 at
    1.3-2e10, 1.7-1.9x faster at 1.3-2e11, 3x at 2e12; 3x at 2000 x 20000 x 2048 = 8e10 in development).
    """
    _check_precision(precision)
    if precision != "auto":
        return precision
    if n_queries * n_train * dim < _BF16_MIN_WORK:
        return "fp32"
    return "bf16" if _native_bf16() else "fp32"


def _tile_rows(
    n_q: int, n_train: int, dim: int, n_cand: int, bf16: bool, chunk_size: int | None, block_rows: int | None
) -> tuple[int, int, int]:
    """(queries per chunk, train rows per block, queries per re-ranking step) keeping temporaries <= MEMORY_BUDGET.

    A quarter of the budget for the query chunk (centred fp32 copy, bf16 copy, candidate lists), half
    for the (chunk x block) screening tile (fp32, or for bf16 the bf16 product and the bf16 train
    block), and the gathered candidate rows of one re-ranking step stay cache-sized (_RERANK_STEP_BYTES,
    see _rerank_step). Within that, a train block
    holds about _TRAIN_BLOCK_BYTES in the matmul's dtype (4096 fp32 or 8192 bf16 rows at dim 2048):
    at 2000 x 100k x 2048, fp32 blocks of 8192 rows were 15% slower, bf16 blocks of 4096 3% slower.
    Explicit chunk_size / block_rows override the first two (and can exceed the budget); so can a huge
    dim or k, each step holding at least one row. Nothing scales with the number of train rows: the
    train matrix is never copied, in either precision.
    """
    per_query = dim * (6 if bf16 else 4) + 48 * n_cand
    q_rows = chunk_size or max(1, min(QUERY_CHUNK, n_q, MEMORY_BUDGET // 4 // per_query))
    row_bytes = 2 * (dim + 4) if bf16 else 4 * dim
    per_train = q_rows * (2 if bf16 else 4) + (row_bytes if bf16 else 0)
    t_rows = block_rows or max(1, min(n_train, _TRAIN_BLOCK_BYTES // row_bytes, MEMORY_BUDGET // 2 // per_train))
    return q_rows, t_rows, min(q_rows, _rerank_step(n_cand, dim))


def _rerank_step(n_cand: int, dim: int) -> int:
    """Queries per re-ranking step: their gathered candidate rows fill about _RERANK_STEP_BYTES (at least one)."""
    return max(1, _RERANK_STEP_BYTES // (4 * n_cand * dim))


def _split_bf16(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write fp32 values `x` as two bf16 columns out[:, 0] + out[:, 1] (about 16 significant bits)."""
    hi = x.to(torch.bfloat16)
    out[:, 0] = hi
    out[:, 1] = x - hi.float()


def _screen(
    qc: torch.Tensor,
    q_norms: torch.Tensor,
    t: torch.Tensor,
    centre: torch.Tensor,
    t_norms: torch.Tensor,
    n_cand: int,
    block_rows: int,
    self_start: int | None,
    bf16: bool,
) -> torch.Tensor:
    """Indices (m, n_cand), unordered, of the smallest screening values of each query row over all train rows.

    `qc` is one chunk of centred queries q - c, `q_norms` their ||q-c||^2 and `t_norms` the ||t-c||^2.
    Train rows are taken block by block; each block's per-row top n_cand is merged into the running top
    n_cand. `self_start` (leave-one-out) is the train index of the chunk's first query row: those diagonal
    entries are masked by index, so exact duplicates of a row still count as its neighbours. The tile
    buffers are allocated once and reused: a fresh 100 MB tensor per block costs about as much in page
    faults as the elementwise work on it.

    fp32 screens by ||t-c||^2 - 2 (q-c).t (one addmm on the train rows in place, no copies), which differs
    from ||q-t||^2 by a per-query constant. bf16 screens by ||q-t||^2 itself, see below.
    """
    m, (n_train, dim) = qc.shape[0], t.shape
    rows = min(block_rows, n_train)
    tile = None if bf16 else torch.empty(m * rows, dtype=torch.float32)
    if bf16:
        # bf16 keeps 8 significant bits (rounding error up to 2^-9 relative); the matmul accumulates in fp32
        # but rounds its output to bf16. Two error sources, each kept small:
        # - Output rounding. Centring (c = train mean) already makes (q-c).(t-c) of the order of the squared
        #   distances rather than of ||q||^2, but rounding -2 (q-c).(t-c) alone still needed 64+ extra
        #   candidates on the benchmark mixture. So the norms and a per-row offset r ride along as extra
        #   columns, split into hi + lo bf16 parts (16 bits):
        #     [-2(q-c) | ||q-c||^2 - r (hi, lo) | 1, 1] . [t-c | 1, 1 | ||t-c||^2 (hi, lo)] = ||q-t||^2 - r
        #   is summed in fp32 and rounded once; r is the row's current n_cand-th best value (0 in the first
        #   block), so the values that decide the cut are near 0 and round with a tiny absolute error.
        # - Rounding the centred rows: an error of about 2^-8 sqrt(sum_i ((q-c)_i (t-c)_i)^2), roughly
        #   2^-8 ||q-c|| ||t-c|| / sqrt(dim) (the dim rounding errors average out), in ||q-t||^2. Small
        #   when neighbours are not much closer than rows are to the mean (deep features, the benchmark
        #   mixture: margin 4-8 sufficed). Tight clusters far apart (||q-c||^2 ~ 50x the k-th squared
        #   distance) needed a margin of 32 (recall 0.999 at 16), the default; for tighter still, precision="fp32".
        q_low = torch.empty((m, dim + 4), dtype=torch.bfloat16)
        q_low[:, :dim] = qc * -2.0
        q_low[:, dim + 2 :] = 1.0
        t_low = torch.empty((rows, dim + 4), dtype=torch.bfloat16)
        t_low[:, dim : dim + 2] = 1.0
        product = torch.empty(m * rows, dtype=torch.bfloat16)
        r = torch.zeros(m, dtype=torch.float32)
    best_v = torch.empty((m, 0), dtype=torch.float32)
    best_i = torch.empty((m, 0), dtype=torch.int64)
    for b in range(0, n_train, block_rows):
        tb = t[b : b + block_rows]
        n = len(tb)
        if not bf16:
            block = tile[: m * n].view(m, n)
            torch.addmm(t_norms[b : b + n], qc, tb.T, alpha=-2.0, out=block)
        else:
            low = t_low[:n]
            for s, c in _row_chunks(tb):
                low[s : s + len(c), :dim] = c - centre  # converts to bf16; cache-sized fp32 temporary
            _split_bf16(t_norms[b : b + n], low[:, dim + 2 :])
            _split_bf16(q_norms - r, q_low[:, dim : dim + 2])
            out = product[: m * n].view(m, n)
            torch.mm(q_low, low.T, out=out)
            block = out  # ranked in bf16 as computed: no fp32 copy of the tile (r is added to the winners)
        if self_start is not None:
            rows_q = torch.arange(m)
            cols = rows_q + (self_start - b)  # train index of query row j is self_start + j
            inside = (cols >= 0) & (cols < n)
            block[rows_q[inside], cols[inside]] = float("inf")
        v, i = torch.topk(block, min(n_cand, n), dim=1, largest=False, sorted=False)
        if bf16:
            v = v.float().add_(r[:, None])
        best_v, best_i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i.add_(b)], dim=1)
        if best_v.shape[1] > n_cand:
            best_v, j = torch.topk(best_v, n_cand, dim=1, largest=False, sorted=False)
            best_i = torch.gather(best_i, 1, j)
        if bf16 and best_v.shape[1] == n_cand:
            r = best_v.max(dim=1).values
            r = torch.where(torch.isfinite(r), r, 0.0)  # a masked (inf) self entry still among the best
    return best_i


def _rerank(
    t: torch.Tensor, q: torch.Tensor, cand: torch.Tensor, k: int, step: int, dist_out: np.ndarray, idx_out: np.ndarray,
    valid: torch.Tensor | None = None,
) -> None:
    """Write the k nearest of each query row's candidates by exact fp32 ||q - t|| into dist_out / idx_out.

    Candidates are sorted by index first, then stably by distance: ties break towards the lower index.
    Rows are processed `step` at a time through one reused (step, n_cand, dim) buffer of gathered rows.
    `valid` (bool, like `cand`) marks padding candidates (False) that must never be returned: each
    row needs at least k valid ones.
    """
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
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in `train`: (dist (Nq,k) float32 ascending, idx (Nq,k) int64).

    `queries=None` searches train against itself; with `exclude_self=True` row i never returns index i
    (leave-one-out, masked by index so exact duplicates still count).

    Work is tiled over chunks of `chunk_size` queries (default up to QUERY_CHUNK) and blocks of
    `block_rows` train rows (default: sized from MEMORY_BUDGET): each pass over the train matrix serves
    a whole query chunk, and temporaries stay within MEMORY_BUDGET whatever N (see `_tile_rows`; the
    outputs come on top; the train matrix is never copied, in either precision).
    Each tile screens candidates with the expansion ||q-c||^2 - 2 (q-c).(t-c) + ||t-c||^2 around c = the
    train mean; the best k + margin candidates of each query are then re-ranked by directly computed
    fp32 ||q - t|| (no cancellation), ties broken towards the lower index.

    `precision` is the screening precision: "fp32" (margin _RERANK_MARGIN), "bf16" (centred rows rounded
    to bf16, margin _RERANK_MARGIN_BF16; see `_screen`) or "auto" (see `screening_precision`).
    Guarantees, in both: the distances returned are always the exact fp32 distances of the returned
    indices, in ascending order, so the j-th distance is never below the true j-th nearest distance.
    With fp32 screening the indices are the exact neighbours (up to float32 rounding of the distances).
    With bf16 screening a true neighbour can be missed only if bf16 rounding pushes it behind k + margin
    other rows, i.e. within a near-tie; the row returned instead is then farther by at most that
    near-tie gap, and so is the score. To check on your data, compare with precision="fp32" (recall_at_k).
    """
    self_search = queries is None or queries is train
    if exclude_self and not self_search:
        raise ValueError("exclude_self=True is leave-one-out over train: pass queries=None")
    _check_precision(precision)
    train = _as_matrix(train, "train")
    if train.shape[0] == 0:
        raise ValueError("train is empty")
    q_np = train if self_search else _as_matrix(queries, "queries")
    if q_np.shape[1] != train.shape[1]:
        raise ValueError(f"queries have {q_np.shape[1]} features but train has {train.shape[1]}")
    n_train, dim = train.shape
    available = n_train - 1 if exclude_self else n_train
    _check_k(k, available, "leave-one-out needs k <= Ntrain - 1" if exclude_self else "k <= Ntrain")
    for name, value in (("chunk_size", chunk_size), ("block_rows", block_rows)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    # Distances are translation invariant: expanding around (a sample of) the train mean c instead of the
    # origin keeps the terms of the expansion small (deep features share a large mean component), so fewer
    # digits cancel before the exact re-ranking below.
    t = _to_torch(train)
    centre = _centre(t, "train")
    t_norms = _sq_norms(t, centre, "train")
    q = t if self_search else _to_torch(q_np)
    q_norms = t_norms if self_search else _sq_norms(q, centre, "queries")

    n_q = q.shape[0]
    bf16 = screening_precision(precision, n_q, n_train, dim) == "bf16"
    n_cand = min(available, k + (_RERANK_MARGIN_BF16 if bf16 else _RERANK_MARGIN))
    q_rows, t_rows, r_rows = _tile_rows(n_q, n_train, dim, n_cand, bf16, chunk_size, block_rows)

    dist_out = np.empty((n_q, k), dtype=np.float32)
    idx_out = np.empty((n_q, k), dtype=np.int64)
    for s in range(0, n_q, q_rows):
        e = min(s + q_rows, n_q)
        self_start = s if exclude_self else None
        cand = _screen(q[s:e] - centre, q_norms[s:e], t, centre, t_norms, n_cand, t_rows, self_start, bf16)
        _rerank(t, q[s:e], cand, k, r_rows, dist_out[s:e], idx_out[s:e])
    return dist_out, idx_out


def knn_score(dist: np.ndarray) -> np.ndarray:
    """DN2 anomaly score: mean Euclidean distance to the k nearest training embeddings, one per row."""
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[1] == 0:
        raise ValueError(f"dist must be a 2-D (n, k) array with k >= 1, got shape {dist.shape}")
    return dist.mean(axis=1, dtype=np.float64).astype(np.float32)


def kmeans(X: np.ndarray, n_centres: int, *, seed: int = 0, n_iter: int = 25) -> np.ndarray:
    """k-means centres (n_centres, d) float32, used to compress a large training set; deterministic per seed."""
    X = _as_matrix(X, "X")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    if not 1 <= n_centres <= len(X):
        raise ValueError(f"n_centres must be between 1 and len(X)={len(X)}, got {n_centres}")
    if n_centres == len(X):
        return X.copy()
    if faiss is not None:
        km = faiss.Kmeans(X.shape[1], int(n_centres), niter=n_iter, seed=seed, verbose=False)
        km.train(X)
        return np.ascontiguousarray(km.centroids, dtype=np.float32).copy()
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_centres, n_init=1, max_iter=n_iter, random_state=seed).fit(X)
    return np.ascontiguousarray(km.cluster_centers_, dtype=np.float32)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Fraction of the true k nearest neighbours (exact_idx) that an approximate search found."""
    approx_idx, exact_idx = np.asarray(approx_idx), np.asarray(exact_idx)
    if approx_idx.shape != exact_idx.shape or approx_idx.ndim != 2:
        raise ValueError(f"expected two (n, k) arrays of equal shape, got {approx_idx.shape} and {exact_idx.shape}")
    if exact_idx.size == 0:
        return 1.0
    hits = (approx_idx[:, :, None] == exact_idx[:, None, :]).any(axis=1)
    return float(hits.mean())


class ExactIndex:
    """Exact search via `knn` (query chunk size, screening precision): keeps a reference to the fitted array."""

    kind = "exact"

    def __init__(self, chunk_size: int | None = None, precision: str = "auto") -> None:
        _check_precision(precision)
        self.chunk_size = chunk_size
        self.precision = precision
        self._X: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return 0 if self._X is None else len(self._X)

    def fit(self, X: np.ndarray) -> ExactIndex:
        X = _as_matrix(X, "X")
        if len(X) == 0:
            raise ValueError("cannot fit an index on an empty array")
        self._X = X
        return self

    def _fitted(self) -> np.ndarray:
        if self._X is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        return self._X

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return knn(self._fitted(), Q, k, chunk_size=self.chunk_size, precision=self.precision)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return knn(self._fitted(), None, k, exclude_self=True, chunk_size=self.chunk_size, precision=self.precision)


_FAISS_PARAMS = {
    "flat": set(),
    "ivf_faiss": {"nlist", "nprobe", "train_rows"},
    "ivfpq": {"nlist", "nprobe", "m", "nbits", "k_factor", "train_rows"},
    "hnsw": {"M", "ef_search", "ef_construction"},
}
_IVF_PARAMS = {"nlist", "nprobe", "train_rows", "precision"}
INDEX_KINDS = ("exact", "ivf", *_FAISS_PARAMS)


class FaissIndex:
    """A FAISS index of one kind ("flat", "ivf_faiss", "ivfpq", "hnsw"); parameters are checked, defaults scale with N.

    "ivf_faiss" is FAISS' IndexIVFFlat, kept for comparison: dn2's own "ivf" (:class:`dn2.ivf.IvfIndex`)
    searches the same kind of index cell by cell with matrix products, many times faster (BENCHMARKS.md).
    """

    def __init__(self, kind: str, **params) -> None:
        if faiss is None:
            raise ImportError(f"index kind {kind!r} needs faiss: pip install faiss-cpu")
        unknown = set(params) - _FAISS_PARAMS[kind]
        if unknown:
            raise ValueError(f"unknown parameters for {kind!r}: {sorted(unknown)}; allowed: {sorted(_FAISS_PARAMS[kind])}")
        self.kind = kind
        self.params = params
        self._index = None
        self._X: np.ndarray | None = None  # reference to the fitted data, used by search_self

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _build(self, n: int, d: int):
        """Construct the untrained FAISS index; nlist defaults to ~4*sqrt(N), capped at N/39 (faiss' minimum)."""
        p = self.params
        if self.kind == "flat":
            return faiss.IndexFlatL2(d)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p.get("M", 32)))
            index.hnsw.efConstruction = int(p.get("ef_construction", 200))
            index.hnsw.efSearch = int(p.get("ef_search", 128))
            return index
        nlist = int(p.get("nlist", max(1, min(round(4 * math.sqrt(n)), n // 39))))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be between 1 and the number of training rows ({n}), got {nlist}")
        self._nlist = nlist
        quantizer = faiss.IndexFlatL2(d)
        if self.kind == "ivf_faiss":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            m = int(p.get("m", max(k for k in range(1, max(1, d // 8) + 1) if d % k == 0)))
            if d % m:
                raise ValueError(f"ivfpq: m={m} must divide the dimension {d}")
            nbits = int(p.get("nbits", max(1, min(8, int(math.log2(max(2, n // 39)))))))
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
        index.nprobe = min(nlist, int(p.get("nprobe", 16)))
        if self.kind == "ivfpq":  # exact re-ranking of k * k_factor PQ candidates (faiss keeps `index` alive)
            index = faiss.IndexRefineFlat(index)
            index.k_factor = float(p.get("k_factor", 8))
        return index

    def _training_sample(self, X: np.ndarray) -> np.ndarray:
        """The rows the coarse quantizer (and PQ) train on: :func:`_training_rows`."""
        return _training_rows(X, getattr(self, "_nlist", 1), self.params.get("train_rows"))

    def fit(self, X: np.ndarray) -> FaissIndex:
        X = _as_matrix(X, "X")
        if len(X) == 0:
            raise ValueError("cannot fit an index on an empty array")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        index = self._build(*X.shape)
        if not index.is_trained:
            index.train(self._training_sample(X))  # _build set self._nlist
        index.add(X)
        self._index, self._X = index, X
        return self

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate (exact for "flat") kNN; rows with fewer than k hits hold idx -1 and dist inf."""
        if self._index is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        Q = _as_matrix(Q, "queries")
        if Q.shape[1] != self._index.d:
            raise ValueError(f"queries have {Q.shape[1]} features but the index has {self._index.d}")
        if not np.isfinite(Q).all():
            raise ValueError("queries contain NaN or infinite values")
        _check_k(k, self.ntotal, "k <= ntotal")
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self._index.hnsw.efSearch, int(k))
        sq, idx = self._index.search(Q, int(k))
        dist = np.sqrt(np.maximum(sq, 0, dtype=np.float32))
        dist[idx < 0] = np.inf
        return dist.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out: search k+1 and drop each row's own index (or the last column if self is absent)."""
        if self._X is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        return _leave_one_out(self, self._X, k)


def _leave_one_out(index, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """search_self of an approximate index: search X for k+1 and drop each row's own index (or, where the
    row itself was not found, the last column)."""
    _check_k(k, len(X) - 1, "leave-one-out needs k <= ntotal - 1")
    dist, idx = index.search(X, k + 1)
    drop = idx == np.arange(len(idx))[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def make_index(kind: str = "exact", **params) -> ExactIndex | FaissIndex:
    """Create an unfitted index: "exact" (chunk_size, precision), "ivf" (dn2's batched IVF: nlist, nprobe,
    train_rows, precision) or a FAISS kind "flat", "ivf_faiss", "ivfpq", "hnsw".

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
        >>> dist, idx = make_index("exact").fit(X).search(X[:2], k=1)
        >>> idx.ravel().tolist(), dist.ravel().tolist()
        ([0, 1], [0.0, 0.0])
    """
    if kind == "exact":
        unknown = set(params) - {"chunk_size", "precision"}
        if unknown:
            raise ValueError(f"unknown parameters for 'exact': {sorted(unknown)}; allowed: ['chunk_size', 'precision']")
        return ExactIndex(**params)
    if kind == "ivf":
        unknown = set(params) - _IVF_PARAMS
        if unknown:
            raise ValueError(f"unknown parameters for 'ivf': {sorted(unknown)}; allowed: {sorted(_IVF_PARAMS)}")
        from .ivf import IvfIndex  # ivf builds on this module's helpers

        return IvfIndex(**params)
    if kind not in _FAISS_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return FaissIndex(kind, **params)
