"""Clustering and subset selection: k-means (FAISS, else scikit-learn) and the greedy k-center coreset.

``kmeans`` compresses a training set to centres (the paper's speed-up). ``kcenter_greedy`` picks a
subset of rows that covers all rows as well as possible (each new row is the one farthest from the
rows picked so far: Gonzalez 1985, a 2-approximation of the k-center problem), as PatchCore does to
shrink its memory bank of patch features (Roth et al. 2022, Alg. 1), on a fixed random projection of
the rows to cut the cost. ``StreamingCoreset`` does the same for rows arriving in pieces, in bounded
memory.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(0, 0.01, (50, 2)), rng.normal(1, 0.01, (50, 2))]).astype(np.float32)
    >>> sorted(kmeans(X, 2).round(1).tolist()) == [[0.0, 0.0], [1.0, 1.0]]
    True
    >>> picked = kcenter_greedy(X, 2)          # one row of each cluster
    >>> sorted((X[picked, 0] > 0.5).tolist())
    [False, True]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import working_memory_bytes
from .exact import knn
from .kernels import as_matrix, to_torch

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
    faiss = None

__all__ = ["CORESET_PROJECTION_DIM", "StreamingCoreset", "kcenter_greedy", "kmeans", "random_projection"]

#: Dimension of the random projection the coreset selection works in (PatchCore's choice; the rows
#: themselves are kept unprojected). Distances are preserved up to a few % (Johnson-Lindenstrauss).
CORESET_PROJECTION_DIM = 128
#: Up to this many rows (e.g. one image's patches), :func:`kcenter_greedy` computes all pairwise distances
#: with one matrix product (16 MiB at 2048 rows) and picks in a numpy loop: far fewer operations per pick.
SMALL_ROWS = 2048
#: Rows per selection step of :class:`StreamingCoreset` (fewer when the working memory demands it).
#: The greedy loop reads the step's projected rows once per pick: 8192 x 128 float32 = 4 MiB stays in
#: the caches, and each step starts from the distances to everything picked before, so it continues
#: one greedy selection instead of starting a new one.
CORESET_STEP_ROWS = 8192


def kmeans(X: np.ndarray, n_centres: int, *, seed: int = 0, n_iter: int = 25) -> np.ndarray:
    """k-means centres (n_centres, d) float32, used to compress a large training set; deterministic per seed."""
    X = as_matrix(X, "X")
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


def random_projection(dim: int, out_dim: int = CORESET_PROJECTION_DIM, seed: int = 0) -> np.ndarray | None:
    """A fixed Gaussian projection (dim, out_dim) / sqrt(out_dim), or None when out_dim >= dim (nothing to gain)."""
    if out_dim >= dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, out_dim)) / math.sqrt(out_dim)).astype(np.float32)


@torch.inference_mode()
def kcenter_greedy(X: np.ndarray, n: int, *, projection: np.ndarray | None | str = "auto",
                   initial: np.ndarray | None = None) -> np.ndarray:
    """Row indices of a greedy k-center selection of at most ``n`` rows of ``X``, in the order picked.

    Each pick is the row farthest (Euclidean) from the rows picked so far, so the picked rows cover
    every row as well as a greedy choice can. The first pick is the row farthest from ``initial`` (the
    distances of every row to an existing selection, e.g. a memory bank built earlier) or, without it,
    the row farthest from the mean. The selection stops early once every row coincides with a picked
    one. ``projection`` (d, p): distances are measured on ``X @ projection``; ``"auto"`` uses
    :func:`random_projection` (seed 0) to :data:`CORESET_PROJECTION_DIM` dimensions when d is larger,
    ``None`` uses the rows themselves. Memory: the projected rows and one distance per row.

    Example:
        >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.0, 0.1]], np.float32)
        >>> kcenter_greedy(X, 2, projection=None).tolist()   # the farthest from the mean, then from it
        [0, 3]
    """
    X = as_matrix(X, "X")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if len(X) == 0:
        raise ValueError("X is empty")
    if isinstance(projection, str):
        if projection != "auto":
            raise ValueError(f"projection must be an array, None or 'auto', got {projection!r}")
        projection = random_projection(X.shape[1])
    Z = to_torch(X) if projection is None else to_torch(X) @ to_torch(as_matrix(projection, "projection"))
    sq = (Z * Z).sum(1)
    if initial is None:
        min_d = torch.full((len(Z),), float("inf"))
        centred = Z - Z.mean(0)
        first = int(torch.argmax((centred * centred).sum(1)))
    else:
        initial = np.asarray(initial, dtype=np.float32).reshape(-1)
        if len(initial) != len(X):
            raise ValueError(f"initial has {len(initial)} distances for {len(X)} rows")
        min_d = to_torch(initial.copy()) ** 2
        first = int(torch.argmax(min_d))
    picked = [first]
    n = min(n, len(X))
    if len(X) <= SMALL_ROWS:  # all pairwise distances at once (one matrix product), then a cheap numpy loop
        D = (sq[:, None] - 2.0 * (Z @ Z.T) + sq[None, :]).numpy()
        min_d = min_d.numpy()
        for _ in range(n - 1):
            last = picked[-1]
            np.minimum(min_d, D[last], out=min_d)
            min_d[last] = 0.0
            nxt = int(np.argmax(min_d))
            if min_d[nxt] <= 0.0:  # every row coincides with a picked one
                break
            picked.append(nxt)
        return np.asarray(picked, dtype=np.int64)
    for _ in range(n - 1):
        last = picked[-1]
        d = sq - 2.0 * (Z @ Z[last]) + sq[last]  # squared distances to the last pick (tiny negatives harmless)
        torch.minimum(min_d, d, out=min_d)
        min_d[last] = 0.0
        nxt = int(torch.argmax(min_d))
        if float(min_d[nxt]) <= 0.0:  # every row coincides with a picked one
            break
        picked.append(nxt)
    return np.asarray(picked, dtype=np.int64)


class StreamingCoreset:
    """A greedy k-center coreset of rows that arrive in pieces, holding a fixed working set.

    ``add(rows)`` buffers rows; every ``step_rows`` rows, ``ceil(fraction * step)`` of them are picked
    by :func:`kcenter_greedy`, each step starting from the distances of its rows to everything picked
    before (an exact nearest-neighbour search, :func:`dn2.search.knn`), so the steps continue one
    greedy selection: a row similar to earlier picks is not picked again. ``finish()`` returns the
    picked rows and their positions in the order of arrival. Memory besides the result: one step of
    rows and their projection (``step_rows`` defaults to :data:`CORESET_STEP_ROWS`, fewer if
    ``dn2.config`` ``working_memory`` is smaller), whatever the number of rows added. Time is linear in
    the number of rows for the greedy loops, plus the search of each step against the picked rows.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> stream = StreamingCoreset(0.1, step_rows=100)
        >>> for part in np.array_split(rng.normal(size=(1000, 8)).astype(np.float32), 7):
        ...     stream.add(part)
        >>> rows, positions = stream.finish()
        >>> rows.shape, bool((np.diff(positions) > 0).all())
        ((100, 8), True)
    """

    def __init__(self, fraction: float, *, projection_dim: int = CORESET_PROJECTION_DIM, seed: int = 0,
                 step_rows: int | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.projection_dim = int(projection_dim)
        self.seed = seed
        self.step_rows = step_rows
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._seen = 0
        self._rows: list[np.ndarray] = []
        self._projected: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._projection: np.ndarray | None = None
        self._dim: int | None = None

    def _step(self, dim: int) -> int:
        if self.step_rows is not None:
            return max(1, int(self.step_rows))
        per_row = 4 * (dim + min(dim, self.projection_dim) + 2)  # the rows, their projection, distances
        return max(1, min(CORESET_STEP_ROWS, working_memory_bytes() // 2 // per_row))

    def add(self, rows: np.ndarray) -> None:
        """Add rows (n, d) float32; every full step is selected at once."""
        rows = as_matrix(rows, "rows")
        if self._dim is None:
            self._dim = rows.shape[1]
            self._projection = random_projection(self._dim, self.projection_dim, self.seed)
        elif rows.shape[1] != self._dim:
            raise ValueError(f"rows have {rows.shape[1]} columns, earlier rows {self._dim}")
        step = self._step(self._dim)
        while len(rows):
            take = min(len(rows), step - self._buffered)
            self._buffer.append(rows[:take])
            self._buffered += take
            rows = rows[take:]
            if self._buffered >= step:
                self._select()

    def _select(self) -> None:
        if not self._buffered:
            return
        chunk = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        Z = chunk if self._projection is None else np.ascontiguousarray(chunk @ self._projection)
        initial = None
        if self._projected:
            bank = np.concatenate(self._projected) if len(self._projected) > 1 else self._projected[0]
            self._projected = [bank]
            initial = knn(bank, Z, 1)[0][:, 0]
        picked = np.sort(kcenter_greedy(Z, math.ceil(self.fraction * len(chunk)), projection=None, initial=initial))
        if initial is not None and len(picked) == 1 and initial[picked[0]] == 0.0:
            picked = picked[:0]  # the whole step coincides with earlier picks
        self._rows.append(np.ascontiguousarray(chunk[picked]))
        self._projected.append(np.ascontiguousarray(Z[picked]))
        self._positions.append(picked + self._seen)
        self._seen += len(chunk)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(picked rows (m, d) float32, their positions (m,) int64 in the order rows were added)."""
        self._select()
        if not self._rows:
            raise ValueError("no rows were added")
        return np.concatenate(self._rows), np.concatenate(self._positions)
