"""What search results become: the DN2 anomaly score, and the recall of an approximate search.

Example:
    >>> import numpy as np
    >>> knn_score(np.array([[1.0, 3.0], [0.0, 0.0]])).tolist()
    [2.0, 0.0]
    >>> recall_at_k(np.array([[0, 9]]), np.array([[0, 1]]))
    0.5
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_score", "recall_at_k"]


def knn_score(dist: np.ndarray) -> np.ndarray:
    """DN2 anomaly score: mean Euclidean distance to the k nearest training embeddings, one per row."""
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[1] == 0:
        raise ValueError(f"dist must be a 2-D (n, k) array with k >= 1, got shape {dist.shape}")
    return dist.mean(axis=1, dtype=np.float64).astype(np.float32)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Fraction of the true k nearest neighbours (exact_idx) that an approximate search found."""
    approx_idx, exact_idx = np.asarray(approx_idx), np.asarray(exact_idx)
    if approx_idx.shape != exact_idx.shape or approx_idx.ndim != 2:
        raise ValueError(f"expected two (n, k) arrays of equal shape, got {approx_idx.shape} and {exact_idx.shape}")
    if exact_idx.size == 0:
        return 1.0
    hits = (approx_idx[:, :, None] == exact_idx[:, None, :]).any(axis=1)
    return float(hits.mean())
