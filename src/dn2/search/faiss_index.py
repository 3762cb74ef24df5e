"""FAISS indexes behind dn2's index interface: "flat", "ivf_faiss", "ivfpq", "hnsw".

They are rebuilt from the data in model files (:meth:`FaissIndex.state` is empty): FAISS' own index
reader is never given a file, as a hostile file could exploit it.

Example:
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> FaissIndex("flat").fit(X).search(X[:2], k=1)[1].ravel().tolist()
    [0, 1]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Param, ParameterError, RebuiltByFitting, check_params, leave_one_out
from .kernels import as_matrix, check_k, training_rows

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
    faiss = None

__all__ = ["FaissIndex"]

_NLIST = Param(int, low=1, allow_none=True, doc="inverted lists (default ~4 sqrt(N), at most N/39)")
_NPROBE = Param(int, low=1, doc="lists visited per query (default 16)")
_TRAIN_ROWS = Param(int, low=1, allow_none=True, doc="rows the quantizer trains on (default max(64 nlist, 20000))")


class FaissIndex(RebuiltByFitting):  # never read from a FAISS file: a hostile file could exploit the reader
    """A FAISS index of one kind ("flat", "ivf_faiss", "ivfpq", "hnsw"); parameters are checked, defaults scale with N.

    "ivf_faiss" is FAISS' IndexIVFFlat, kept for comparison: dn2's own "ivf" (:class:`dn2.search.IvfIndex`)
    searches the same kind of index cell by cell with matrix products, many times faster (BENCHMARKS.md).
    """

    PARAMS: dict[str, dict[str, Param]] = {
        "flat": {},
        "ivf_faiss": {"nlist": _NLIST, "nprobe": _NPROBE, "train_rows": _TRAIN_ROWS},
        "ivfpq": {
            "nlist": _NLIST, "nprobe": _NPROBE, "train_rows": _TRAIN_ROWS,
            "m": Param(int, low=1, doc="sub-quantizers; must divide d (default: the largest divisor <= d/8)"),
            "nbits": Param(int, low=1, high=16, doc="bits per sub-quantizer code (default log2(N/39), at most 8)"),
            "k_factor": Param(float, low=1, doc="PQ candidates re-ranked exactly, per neighbour (default 8)"),
        },
        "hnsw": {
            "M": Param(int, low=2, doc="graph neighbours per node (default 32)"),
            "ef_search": Param(int, low=1, doc="search beam width (default 128, at least k)"),
            "ef_construction": Param(int, low=1, doc="construction beam width (default 200)"),
        },
    }

    def __init__(self, kind: str, **params: Any) -> None:
        if kind not in self.PARAMS:
            raise ParameterError(f"unknown FAISS index kind {kind!r}; choose one of {', '.join(self.PARAMS)}")
        if faiss is None:
            raise ImportError(f"index kind {kind!r} needs faiss: pip install faiss-cpu")
        self.kind = kind
        self._params = check_params(kind, self.PARAMS[kind], params)
        self._index = None
        self._X: np.ndarray | None = None  # reference to the fitted data, used by search_self

    @property
    def params(self) -> dict[str, Any]:
        """The construction parameters (only those given; the others take data-dependent defaults)."""
        return dict(self._params)

    @property
    def ntotal(self) -> int:
        """Number of indexed rows (0 before fit)."""
        return 0 if self._index is None else int(self._index.ntotal)

    def _build(self, n: int, d: int):
        """Construct the untrained FAISS index; nlist defaults to ~4*sqrt(N), capped at N/39 (faiss' minimum)."""
        p = self._params
        if self.kind == "flat":
            return faiss.IndexFlatL2(d)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.get("M", 32))
            index.hnsw.efConstruction = p.get("ef_construction", 200)
            index.hnsw.efSearch = p.get("ef_search", 128)
            return index
        nlist = p.get("nlist") or max(1, min(round(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise ValueError(f"nlist must be between 1 and the number of training rows ({n}), got {nlist}")
        self._nlist = nlist
        quantizer = faiss.IndexFlatL2(d)
        if self.kind == "ivf_faiss":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            m = p.get("m", max(k for k in range(1, max(1, d // 8) + 1) if d % k == 0))
            if d % m:
                raise ValueError(f"ivfpq: m={m} must divide the dimension {d}")
            nbits = p.get("nbits", max(1, min(8, int(math.log2(max(2, n // 39))))))
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits)
        index.nprobe = min(nlist, p.get("nprobe", 16))
        if self.kind == "ivfpq":  # exact re-ranking of k * k_factor PQ candidates (faiss keeps `index` alive)
            index = faiss.IndexRefineFlat(index)
            index.k_factor = p.get("k_factor", 8.0)
        return index

    def training_sample(self, X: np.ndarray) -> np.ndarray:
        """The rows the coarse quantizer (and PQ) train on (:func:`dn2.search.kernels.training_rows`)."""
        return training_rows(X, getattr(self, "_nlist", 1), self._params.get("train_rows"))

    def fit(self, X: np.ndarray) -> FaissIndex:
        """Build, train (on a sample, see :meth:`training_sample`) and fill the FAISS index with X."""
        X = as_matrix(X, "X")
        if len(X) == 0:
            raise ValueError("cannot fit an index on an empty array")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        index = self._build(*X.shape)
        if not index.is_trained:
            index.train(self.training_sample(X))  # _build set self._nlist
        index.add(X)
        self._index, self._X = index, X
        return self

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate (exact for "flat") kNN; rows with fewer than k hits hold idx -1 and dist inf."""
        if self._index is None:
            raise RuntimeError("index is not fitted: call fit(X) first")
        Q = as_matrix(Q, "queries")
        if Q.shape[1] != self._index.d:
            raise ValueError(f"queries have {Q.shape[1]} features but the index has {self._index.d}")
        if not np.isfinite(Q).all():
            raise ValueError("queries contain NaN or infinite values")
        check_k(k, self.ntotal, "k <= ntotal")
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
        return leave_one_out(self, self._X, k)

