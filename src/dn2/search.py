"""Nearest-neighbour search for DN2: exact chunked kNN (torch), FAISS indexes, k-means compression.

All arrays are float32; every distance returned is Euclidean (never squared).
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

__all__ = ["knn", "knn_score", "kmeans", "make_index", "recall_at_k", "ExactIndex", "FaissIndex", "INDEX_KINDS"]

MEMORY_BUDGET = 256 * 2**20  # bytes of temporaries per query chunk in the exact path
_NORM_CHUNK_BYTES = 2 * 2**20  # cache-sized row chunks for the squared-norm pass
_RERANK_MARGIN = 8  # candidates beyond k re-ranked by exact distance (near-ties, rounding of the expansion)


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
    if not bool(torch.isfinite(out).all()):
        bad = int(torch.nonzero(~torch.isfinite(out))[0, 0])
        if not bool(torch.isfinite(x[bad]).all()):
            raise ValueError(f"{name} contains NaN or infinite values (first at row {bad})")
        raise ValueError(f"{name} has values too large for float32 distances (row {bad})")
    return out


def _check_k(k: int, available: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= available:
        raise ValueError(f"k must be between 1 and {available} ({what}), got {k}")


@torch.inference_mode()
def knn(
    train: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in `train`: (dist (Nq,k) float32 ascending, idx (Nq,k) int64).

    `queries=None` searches train against itself; with `exclude_self=True` row i never returns index i
    (leave-one-out, masked by index so exact duplicates still count). Queries are processed in chunks
    so the (chunk x Ntrain) distance block stays within MEMORY_BUDGET; candidates found via the fast
    ||q||^2 - 2 q.t + ||t||^2 expansion are re-ranked by directly computed ||q - t|| to avoid cancellation.
    """
    self_search = queries is None or queries is train
    if exclude_self and not self_search:
        raise ValueError("exclude_self=True is leave-one-out over train: pass queries=None")
    train = _as_matrix(train, "train")
    if train.shape[0] == 0:
        raise ValueError("train is empty")
    q_np = train if self_search else _as_matrix(queries, "queries")
    if q_np.shape[1] != train.shape[1]:
        raise ValueError(f"queries have {q_np.shape[1]} features but train has {train.shape[1]}")
    n_train, dim = train.shape
    available = n_train - 1 if exclude_self else n_train
    _check_k(k, available, "leave-one-out needs k <= Ntrain - 1" if exclude_self else "k <= Ntrain")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    # Distances are translation invariant: expanding around (a sample of) the train mean c instead of the
    # origin keeps the float32 terms of ||q-c||^2 - 2 (q-c).(t-c) + ||t-c||^2 small (deep features share a
    # large mean component), so fewer digits cancel before the exact re-ranking below.
    t = _to_torch(train)
    centre = _centre(t, "train")
    t_norms = _sq_norms(t, centre, "train")
    q = t if self_search else _to_torch(q_np)
    q_norms = t_norms if self_search else _sq_norms(q, centre, "queries")

    n_cand = min(available, k + _RERANK_MARGIN)
    if chunk_size is None:  # bytes per query row: distance block + gathered candidate rows + centred query
        per_row = 4 * (n_train + n_cand * dim + dim)
        chunk_size = max(1, MEMORY_BUDGET // per_row)

    n_q = q.shape[0]
    dist_out = np.empty((n_q, k), dtype=np.float32)
    idx_out = np.empty((n_q, k), dtype=np.int64)
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        qc = q[s:e]
        qs = qc - centre
        block = qs @ t.T  # (c, Ntrain): becomes squared distances in place; (q-c).(t-c) = (q-c).t - (q-c).c
        block.sub_((qs @ centre)[:, None]).mul_(-2.0).add_(t_norms).add_(q_norms[s:e, None])
        if exclude_self:
            rows = torch.arange(e - s)
            block[rows, rows + s] = float("inf")
        cand = torch.topk(block, n_cand, dim=1, largest=False, sorted=False).indices
        del block
        # Exact re-ranking: sort candidates by index first so ties break towards the lower index.
        cand = torch.sort(cand, dim=1).values
        diff = t[cand].sub_(qc[:, None, :])  # float32 differences carry no cancellation error
        exact = torch.linalg.vector_norm(diff, dim=2)
        del diff
        order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
        dist_out[s:e] = torch.gather(exact, 1, order).numpy()
        idx_out[s:e] = torch.gather(cand, 1, order).numpy()
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
    """Exact search via `knn`: keeps a reference to the fitted array (no copy)."""

    kind = "exact"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
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
        return knn(self._fitted(), Q, k, chunk_size=self.chunk_size)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return knn(self._fitted(), None, k, exclude_self=True, chunk_size=self.chunk_size)


_FAISS_PARAMS = {
    "flat": set(),
    "ivf": {"nlist", "nprobe"},
    "ivfpq": {"nlist", "nprobe", "m", "nbits", "k_factor"},
    "hnsw": {"M", "ef_search", "ef_construction"},
}
INDEX_KINDS = ("exact", *_FAISS_PARAMS)


class FaissIndex:
    """A FAISS index of one kind ("flat", "ivf", "ivfpq", "hnsw"); parameters are checked, defaults scale with N."""

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
        quantizer = faiss.IndexFlatL2(d)
        if self.kind == "ivf":
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

    def fit(self, X: np.ndarray) -> FaissIndex:
        X = _as_matrix(X, "X")
        if len(X) == 0:
            raise ValueError("cannot fit an index on an empty array")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        index = self._build(*X.shape)
        if not index.is_trained:
            index.train(X)
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
        _check_k(k, self.ntotal - 1, "leave-one-out needs k <= ntotal - 1")
        dist, idx = self.search(self._X, k + 1)
        drop = idx == np.arange(len(idx))[:, None]
        drop[~drop.any(axis=1), -1] = True
        keep = ~drop
        return dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def make_index(kind: str = "exact", **params) -> ExactIndex | FaissIndex:
    """Create an unfitted index: "exact" (torch, chunk_size=...), "flat", "ivf", "ivfpq" or "hnsw" (faiss)."""
    if kind == "exact":
        unknown = set(params) - {"chunk_size"}
        if unknown:
            raise ValueError(f"unknown parameters for 'exact': {sorted(unknown)}; allowed: ['chunk_size']")
        return ExactIndex(**params)
    if kind not in _FAISS_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return FaissIndex(kind, **params)
