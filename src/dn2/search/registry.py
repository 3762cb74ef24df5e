"""The index kinds: one table from each kind to its class and its parameters' constraints.

:func:`make_index` is the one place where a kind and its parameters are checked (unknown kind,
unknown parameter, wrong type or range) before an index is built; :func:`restore_index` rebuilds a
fitted index from the data and its saved state (model files).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np

from .base import Index, Param, ParameterError, check_params
from .exact import ExactIndex
from .faiss_index import FaissIndex
from .ivf import IvfIndex

__all__ = ["INDEX_KINDS", "REGISTRY", "IndexKind", "make_index", "restore_index"]


@dataclass(frozen=True)
class IndexKind:
    """One row of the registry: how to build an index of this kind, its parameters, and what it is."""

    factory: Callable[..., Index]
    params: Mapping[str, Param]
    summary: str


REGISTRY: dict[str, IndexKind] = {
    "exact": IndexKind(ExactIndex, ExactIndex.PARAMS, "exact tiled kNN, certified (dn2.search.knn)"),
    "ivf": IndexKind(IvfIndex, IvfIndex.PARAMS, "dn2's inverted file, batched per cell (approximate)"),
    "flat": IndexKind(partial(FaissIndex, "flat"), FaissIndex.PARAMS["flat"], "FAISS IndexFlatL2 (exact)"),
    "ivf_faiss": IndexKind(partial(FaissIndex, "ivf_faiss"), FaissIndex.PARAMS["ivf_faiss"],
                           "FAISS IndexIVFFlat (approximate)"),
    "ivfpq": IndexKind(partial(FaissIndex, "ivfpq"), FaissIndex.PARAMS["ivfpq"],
                       "FAISS IndexIVFPQ with exact re-ranking (approximate)"),
    "hnsw": IndexKind(partial(FaissIndex, "hnsw"), FaissIndex.PARAMS["hnsw"], "FAISS IndexHNSWFlat (approximate)"),
}
INDEX_KINDS = tuple(REGISTRY)


def make_index(kind: str = "exact", **params: Any) -> Index:
    """Create an unfitted index of a registered kind; `params` are checked against the registry.

    Kinds: "exact" (chunk_size, precision), "ivf" (dn2's batched IVF: nlist, nprobe, train_rows,
    precision) and the FAISS kinds "flat", "ivf_faiss" (nlist, nprobe, train_rows), "ivfpq" (also m,
    nbits, k_factor) and "hnsw" (M, ef_search, ef_construction). Raises :class:`ParameterError` (a
    ValueError) for an unknown kind or parameter, or a value of the wrong type or out of range.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
        >>> dist, idx = make_index("exact").fit(X).search(X[:2], k=1)
        >>> idx.ravel().tolist(), dist.ravel().tolist()
        ([0, 1], [0.0, 0.0])
        >>> make_index("ivf", nprobe=0)
        Traceback (most recent call last):
        ...
        dn2.search.base.ParameterError: index 'ivf': nprobe must be an int in [1, inf), got 0
    """
    entry = REGISTRY.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ParameterError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return entry.factory(**check_params(kind, entry.params, params))


def restore_index(kind: str, X: np.ndarray, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Index:
    """Rebuild a fitted index from the data it was fitted on, its parameters and its :meth:`~Index.state`.

    The arrays are checked (they may come from an untrusted model file); nothing is unpickled and FAISS'
    own index reader is never used.
    """
    return make_index(kind, **params).restore(X, state)
