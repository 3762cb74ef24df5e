"""Nearest-neighbour search for DN2: exact tiled kNN (torch), dn2's batched IVF, FAISS indexes, k-means,
and the greedy k-center coreset of a memory bank.

All arrays are float32; every distance returned is Euclidean (never squared). Every index kind
satisfies the :class:`Index` protocol and is made by :func:`make_index` from the registry
(:data:`INDEX_KINDS`). The exact search (:func:`knn`, kind "exact") screens candidates with a
matrix product in fp32 or bf16, re-ranks them by directly computed fp32 distances and certifies
the result, so its neighbours are the true ones in every precision.

Modules: :mod:`~dn2.search.kernels` (centring, tile screening, :class:`~dn2.search.kernels.ResultHeap`,
re-ranking, error bounds), :mod:`~dn2.search.exact`, :mod:`~dn2.search.ivf`,
:mod:`~dn2.search.faiss_index`, :mod:`~dn2.search.cluster`, :mod:`~dn2.search.registry`,
:mod:`~dn2.search.base` (the protocol, parameter constraints), :mod:`~dn2.search.scores`.

Example:
    >>> import numpy as np
    >>> from dn2.search import knn, knn_score, make_index
    >>> X = np.random.default_rng(0).normal(size=(2000, 32)).astype(np.float32)
    >>> dist, idx = knn(X, None, k=2, exclude_self=True)       # leave-one-out
    >>> knn_score(dist).shape
    (2000,)
    >>> index = make_index("ivf", nprobe=8).fit(X)
    >>> isinstance(index, Index), sorted(index.state())
    (True, ['centres', 'offsets', 'order'])
"""

from .base import Index, Param, ParameterError, check_params
from .cluster import CORESET_PROJECTION_DIM, StreamingCoreset, kcenter_greedy, kmeans, random_projection
from .exact import ExactIndex, knn, pairwise_distances, screening_precision
from .faiss_index import FaissIndex
from .ivf import IvfIndex, default_nlist
from .kernels import SCREENING_PRECISIONS
from .registry import INDEX_KINDS, REGISTRY, IndexKind, make_index, restore_index
from .scores import knn_score, recall_at_k

__all__ = [
    "CORESET_PROJECTION_DIM", "INDEX_KINDS", "REGISTRY", "SCREENING_PRECISIONS", "ExactIndex", "FaissIndex", "Index",
    "IndexKind", "IvfIndex", "Param", "ParameterError", "StreamingCoreset", "check_params", "default_nlist",
    "kcenter_greedy", "kmeans", "knn", "knn_score", "make_index", "random_projection", "pairwise_distances", "recall_at_k", "restore_index",
    "screening_precision",
]
