"""Clustering for compression and indexing: k-means (FAISS, else scikit-learn).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(0, 0.01, (50, 2)), rng.normal(1, 0.01, (50, 2))]).astype(np.float32)
    >>> sorted(kmeans(X, 2).round(1).tolist()) == [[0.0, 0.0], [1.0, 1.0]]
    True
"""

from __future__ import annotations

import numpy as np

from .kernels import as_matrix

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
    faiss = None

__all__ = ["kmeans"]


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
