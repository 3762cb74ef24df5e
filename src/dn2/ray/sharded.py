"""A :class:`dn2.KNNDetector` whose memory bank is split over Ray actors, one index shard each.

Each shard holds a contiguous part of the training rows (in input order) and an index from
:mod:`dn2.search` (``make_index(index, **index_params)``) over its rows kept in memory. A query
batch is broadcast to every shard; each returns its k nearest (distances, and row numbers that the
driver turns into global ones); the driver merges them with :class:`dn2.search.kernels.ResultHeap`,
the search package's running top-k merge. For the exact index the k smallest distances over all
shards are the k smallest over the whole bank, each computed by the same fp32 kernel, so scores
equal the single-machine ones exactly (exact ties may pick another, equally near, neighbour).

Leave-one-out training scores: the shard holding a row searches itself without that row
(``search_self``), every other shard searches the row as a query, and the results are merged the
same way; so ``train_scores_``, ``kept_`` (with ``clean``) and ``threshold_`` are those of
:class:`dn2.KNNDetector` fitted on the same embeddings. The embedding transform is fitted on the
driver over all embeddings first (only its transforms with state need them there: the default
``sqrt_l2`` is stateless), then applied by each shard to its rows.

A fitted detector becomes an ordinary :class:`dn2.KNNDetector` (:meth:`ShardedKNNDetector.to_detector`,
when its memory fits one machine), or is saved as a *manifest*: a JSON file listing one model file
per shard with its sha256 (:meth:`ShardedKNNDetector.save_manifest`; each shard writes its own file,
so the bank never passes through the driver). :func:`load_manifest` puts the shards on actors
again. Scaling: memory per shard ~ N/shards x D x 4 bytes; query latency ~ broadcast + the slowest
shard + the merge.

Example:
    >>> import numpy as np
    >>> from dn2.ray import ShardedKNNDetector
    >>> X = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    >>> det = ShardedKNNDetector(k=2, n_shards=2).fit(X)                 # doctest: +SKIP
    >>> det.anomaly_score(X[:3]).shape, det.to_detector().threshold_ == det.threshold_  # doctest: +SKIP
    ((3,), True)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import validate_data

from ..base import ThresholdedScores
from ..detector import KNNDetector, clean_training_set, load, training_threshold
from ..images import printable
from ..modelfile import write_model
from ..normalize import EmbeddingTransform, make_transform
from ..outputs import atomic_path, check_output_path
from ..params import Constraint, Interval, validate
from ..search import knn_score, make_index
from ..search.kernels import ResultHeap, to_torch
from .embed import read_embeddings, read_shard, shard_files

__all__ = [
    "MANIFEST_FORMAT", "IndexShard", "ModelFilePart", "RowsPart", "ShardState", "ShardedKNNDetector", "file_slices",
    "detector_state", "file_sha256", "load_manifest", "merge_topk", "read_manifest", "shard_bounds", "share_cpus",
]

MANIFEST_FORMAT = "dn2-sharded-model"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest lists files; anything larger is not one
_SHARED_PARAMS = ("k", "clean", "contamination", "fpr", "index", "index_params", "normalize", "normalize_params",
                  "blocks")


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges of ``n`` rows over ``n_shards`` shards, sizes within one.

    Example:
        >>> shard_bounds(10, 3)
        [(0, 3), (3, 6), (6, 10)]
    """
    edges = [(i * n) // n_shards for i in range(n_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def file_slices(rows: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Rows start:stop of files holding ``rows`` rows each, one after the other, as (file, first, end) slices.

    Example:
        >>> file_slices([4, 4, 4], 3, 9)
        [(0, 3, 4), (1, 0, 4), (2, 0, 1)]
    """
    out, offset = [], 0
    for f, n in enumerate(rows):
        a, b = max(start - offset, 0), min(stop - offset, n)
        if a < b:
            out.append((f, a, b))
        offset += n
    return out


def merge_topk(parts: Iterable[tuple[np.ndarray, np.ndarray]], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest distances per row over several shards' results, with their (global) row numbers.

    ``parts``: (dist (n, j), idx (n, j)) per shard, any j (a small shard may return fewer than k);
    merged with :class:`dn2.search.kernels.ResultHeap`, sorted ascending, equal distances by index.

    Example:
        >>> d, i = merge_topk([(np.array([[1.0, 4.0]]), np.array([[0, 1]])),
        ...                    (np.array([[2.0, 3.0]]), np.array([[7, 8]]))], n=1, k=3)
        >>> d.tolist(), i.tolist()
        ([[1.0, 2.0, 3.0]], [[0, 7, 8]])
    """
    heap = ResultHeap(n, k)
    for dist, idx in parts:
        if dist.shape[1]:
            heap.add_result(to_torch(np.ascontiguousarray(dist, dtype=np.float32)),
                            torch.from_numpy(np.array(idx, dtype=np.int64)))
    dist, idx = heap.finalize()
    return dist.numpy(), idx.numpy()


def detector_state(params: dict[str, Any], memory: np.ndarray, names: list[str], threshold: float,
                   train_scores: np.ndarray, kept: np.ndarray,
                   transform: EmbeddingTransform) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, tensors) of a fitted :class:`dn2.KNNDetector`, as its ``to_state`` gives them.

    Read back by ``KNNDetector.from_state`` (which checks every field), so a format change there is
    caught by the tests of this package.
    """
    header = {"params": params, "memory_names": list(names), "threshold": float(threshold),
              "n_features_in": int(memory.shape[1])}
    tensors = {"memory": np.ascontiguousarray(memory, dtype=np.float32),
               "train_scores": np.asarray(train_scores, dtype=np.float32),
               "kept": np.asarray(kept, dtype=np.int64)}
    tensors.update({f"normalize/{key}": value for key, value in transform.state().items()})
    return header, tensors


def share_cpus(n_shards: int) -> float:
    """CPUs per shard actor: the cluster's CPUs shared out (whole CPUs when there are enough, else fractions).

    Shard actors hold their CPUs while they live, so together they must not ask for more than the
    cluster has: Ray would wait for the missing ones forever.
    """
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1.0, cpus // n_shards) if cpus >= n_shards else cpus / n_shards


# ------------------------------------------------------------------------------------------ one shard


@dataclass
class ShardState:
    """What an index shard holds: its training rows (transformed) and which of them are in memory."""

    memory: np.ndarray
    names: list[str]  # of the memory rows
    keep: np.ndarray  # local row numbers of the memory rows among the shard's training rows
    dropped: np.ndarray  # training rows not kept (clean), transformed: scored as queries
    transform: EmbeddingTransform
    train_scores: np.ndarray | None = None  # known when loaded from a model file
    params: dict[str, Any] = field(default_factory=dict)
    index: Any = None


@dataclass
class RowsPart:
    """A shard's raw rows (an array, or Parquet files of :func:`dn2.ray.embed_to_parquet`) and the
    fitted transform; ``keep`` selects the memory rows (after ``clean``). Everything a restarted actor
    needs to rebuild the same shard."""

    transform: EmbeddingTransform
    vectors: Any = None  # (n, D) float32 array, or an ObjectRef of one
    names: list[str] | None = None
    files: tuple[tuple[str, int, int], ...] = ()  # (Parquet file, first, end) in its good rows
    keep: np.ndarray | None = None

    def load(self) -> ShardState:
        if self.files:
            parts = [(read_shard(f)[0], a, b) for f, a, b in self.files]
            raw = np.concatenate([p.vectors[a:b] for p, a, b in parts])
            names = [n for p, a, b in parts for n in p.names[a:b]]
        else:
            raw = ray.get(self.vectors) if isinstance(self.vectors, ray.ObjectRef) else self.vectors
            names = list(self.names or [])
        rows = self.transform.transform(raw)
        keep = np.arange(len(rows)) if self.keep is None else np.asarray(self.keep, dtype=np.int64)
        dropped = np.setdiff1d(np.arange(len(rows)), keep)
        return ShardState(np.ascontiguousarray(rows[keep]), [names[i] for i in keep], keep,
                          np.ascontiguousarray(rows[dropped]), self.transform)


@dataclass
class ModelFilePart:
    """A shard saved as a :class:`dn2.KNNDetector` model file, checked against its manifest digest."""

    path: str
    sha256: str

    def load(self) -> ShardState:
        digest = file_sha256(self.path)
        if digest != self.sha256:
            raise ValueError(f"{printable(self.path)}: sha256 {digest} differs from the manifest's {self.sha256}")
        det = load(self.path)
        if not isinstance(det, KNNDetector):
            raise ValueError(f"{printable(self.path)}: a shard must be a KNNDetector model file")
        return ShardState(det.memory_, list(det.memory_names_), det.kept_, np.empty((0, det.n_features_in_), np.float32),
                          det.normalizer_, det.train_scores_, det.get_params(), det.index_)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            h.update(block)
    return h.hexdigest()


class IndexShard:
    """One shard on a Ray actor: its memory rows, their index (:func:`dn2.search.make_index`) and names.

    Built entirely from its constructor arguments, so Ray can restart it after a failure.
    """

    def __init__(self, part: RowsPart | ModelFilePart, index: str, index_params: dict[str, Any] | None) -> None:
        self.state = part.load()
        if self.state.index is None and len(self.state.memory):
            self.state.index = make_index(index, **(index_params or {})).fit(self.state.memory)

    def info(self) -> dict[str, Any]:
        s = self.state
        train_rows = len(s.memory) + len(s.dropped) if s.train_scores is None else len(s.train_scores)
        return {"memory_rows": len(s.memory), "train_rows": train_rows, "keep": s.keep,
                "train_scores": s.train_scores, "params": s.params, "dim": s.memory.shape[1]}

    def transform(self) -> EmbeddingTransform:
        return self.state.transform

    def rows(self, which: str, start: int, stop: int) -> np.ndarray:
        """Memory rows (``"memory"``) or dropped training rows (``"dropped"``) start:stop, as queries."""
        return (self.state.memory if which == "memory" else self.state.dropped)[start:stop]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k (at most the shard's rows) nearest memory rows of each query: (dist, local row numbers)."""
        k = min(k, len(self.state.memory))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        return self.state.index.search(queries, k)

    def search_self(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out within the shard (each row's own index excluded), k at most rows - 1."""
        n = len(self.state.memory)
        k = min(k, n - 1)
        if k <= 0:
            return np.empty((n, 0), np.float32), np.empty((n, 0), np.int64)
        return self.state.index.search_self(k)

    def names_of(self, local: np.ndarray) -> list[str]:
        return [self.state.names[int(i)] for i in local]

    def memory(self) -> tuple[np.ndarray, list[str]]:
        return self.state.memory, self.state.names

    def save(self, path: str, params: dict[str, Any], threshold: float, train_scores: np.ndarray,
             force: bool) -> str:
        """Write this shard as a :class:`dn2.KNNDetector` model file; its sha256."""
        header, tensors = detector_state(params, self.state.memory, self.state.names, threshold, train_scores,
                                         self.state.keep, self.state.transform)
        write_model(path, {"kind": "KNNDetector", "detector": header}, tensors, force=force)
        return file_sha256(path)


# ------------------------------------------------------------------------------------------ the detector


class ShardedKNNDetector(ThresholdedScores, OutlierMixin, BaseEstimator):
    """:class:`dn2.KNNDetector` with the memory bank split over ``n_shards`` Ray actors.

    Parameters as :class:`dn2.KNNDetector` (``k``, ``clean``, ``contamination``, ``fpr``, ``index``,
    ``index_params``, ``normalize``, ``normalize_params``, ``blocks``; k-means compression,
    ``n_centres``, makes a bank that fits one machine: use :class:`dn2.KNNDetector` for it), plus
    ``n_shards`` (index actors), ``query_rows`` (queries broadcast per round: bounds what each shard
    receives at once), ``cpus_per_shard`` (each actor's CPUs, its search threads) and
    ``max_restarts`` (times Ray restarts a lost shard actor, which rebuilds itself; its calls are
    retried as often). Needs an open Ray session (:func:`dn2.ray.ray_session`) while fitted.

    Fitted attributes: ``n_features_in_``, ``normalizer_``, ``train_scores_``, ``kept_``,
    ``threshold_``, ``offset_``, ``shards_`` (the actor handles), ``memory_offsets_`` (first global
    memory row of each shard, and the total).
    """

    parameter_constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        **{name: KNNDetector.parameter_constraints[name] for name in _SHARED_PARAMS},
        "n_shards": [Interval(int, 1, None)],
        "query_rows": [Interval(int, 1, None)],
        "cpus_per_shard": [Interval(float, 0.0, None, closed="neither")],
        "max_restarts": [Interval(int, 0, None)],
    }

    def __init__(self, k: int = 2, clean: float = 0.0, contamination: float | None = None, fpr: float = 0.05,
                 index: str = "exact", index_params: dict[str, Any] | None = None, normalize: str = "none",
                 normalize_params: dict[str, Any] | None = None, blocks: tuple[int, ...] | None = None,
                 n_shards: int = 2, query_rows: int = 8192, cpus_per_shard: float = 1.0, max_restarts: int = 3):
        self.k = k
        self.clean = clean
        self.contamination = contamination
        self.fpr = fpr
        self.index = index
        self.index_params = index_params
        self.normalize = normalize
        self.normalize_params = normalize_params
        self.blocks = blocks
        self.n_shards = n_shards
        self.query_rows = query_rows
        self.cpus_per_shard = cpus_per_shard
        self.max_restarts = max_restarts

    def local_detector(self) -> KNNDetector:
        """The unfitted single-machine :class:`dn2.KNNDetector` with the same method parameters."""
        return KNNDetector(**{name: getattr(self, name) for name in _SHARED_PARAMS})

    def check_params(self, n_samples: int | None = None) -> None:
        """Check every parameter (the method's through :meth:`dn2.KNNDetector.check_params`)."""
        validate(type(self).__name__, self.get_params(), self.parameter_constraints)
        self.local_detector().check_params(n_samples)
        if n_samples is not None and n_samples < self.n_shards:
            raise ValueError(f"n_shards={self.n_shards} exceeds the {n_samples} training rows")

    # -- fitting ---------------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, names: Sequence[str] | None = None) -> "ShardedKNNDetector":
        """Index the training embeddings over the shards and set the threshold from their leave-one-out scores.

        ``X``: an (n, D) array (split into contiguous shards), or a folder written by
        :func:`dn2.ray.embed_to_parquet` (each shard actor reads its own files; good rows only).
        """
        self.check_params()
        if isinstance(X, (str, os.PathLike)):
            parts, n = self._folder_parts(Path(X))
        else:
            X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32))
            names = [str(i) for i in range(len(X))] if names is None else [str(v) for v in names]
            if len(names) != len(X):
                raise ValueError(f"{len(names)} names for {len(X)} embeddings")
            self.check_params(len(X))
            transform = self._transform(X)
            parts = [RowsPart(transform, ray.put(np.ascontiguousarray(X[a:b])), names[a:b])
                     for a, b in shard_bounds(len(X), self.n_shards)]
            n = len(X)
        self._start(parts)
        if self.clean > 0:
            loo = knn_score(self._memory_neighbours(self.k)[0])
            kept = clean_training_set(loo, self.clean, self.k)
            starts = self.train_offsets_[:-1]
            for part, a, b in zip(parts, starts, self.train_offsets_[1:]):
                part.keep = kept[(kept >= a) & (kept < b)] - a
            self.shutdown()
            self._start(parts)
        self.kept_ = np.concatenate([info["keep"] + a for info, a in zip(self.infos_, self.train_offsets_)])
        self.train_scores_ = self._training_scores(n)
        self._set_threshold()
        return self

    def _transform(self, X: np.ndarray) -> EmbeddingTransform:
        return make_transform(self.normalize, self.blocks, **(self.normalize_params or {})).fit(X)

    def _folder_parts(self, folder: Path) -> tuple[list[RowsPart], int]:
        """Shards of contiguous rows of the Parquet files (each actor reads its own); the transform fitted on the driver."""
        files = shard_files(folder)
        rows = np.array([pq.read_table(f, columns=["error"]).column("error").null_count for f in files])
        n = int(rows.sum())
        self.n_features_in_ = int(pq.read_schema(files[0]).field("embedding").type.list_size)
        self.check_params(n)
        probe = make_transform(self.normalize, self.blocks, **(self.normalize_params or {}))
        if probe.stateless:
            transform = probe.fit(np.zeros((1, self.n_features_in_), np.float32))  # checks the block widths only
        else:  # the transform's statistics need every embedding, as KNNDetector fits them
            transform = self._transform(read_embeddings(folder).vectors)
        return [RowsPart(transform, files=tuple((str(files[f]), a, b) for f, a, b in file_slices(rows.tolist(), start, stop)))
                for start, stop in shard_bounds(n, self.n_shards)], n

    def _start(self, parts: Sequence[RowsPart | ModelFilePart]) -> None:
        """Start one actor per part; read their sizes."""
        total = ray.cluster_resources().get("CPU", 0)
        if len(parts) * self.cpus_per_shard > total:  # the actors would wait for CPUs forever
            raise ValueError(f"{len(parts)} shards x cpus_per_shard={self.cpus_per_shard:g} need more than the "
                             f"cluster's {total:g} CPUs; use fewer shards or a smaller cpus_per_shard")
        actor = ray.remote(IndexShard).options(num_cpus=self.cpus_per_shard, max_restarts=self.max_restarts,
                                               max_task_retries=self.max_restarts)
        self._parts = list(parts)  # keeps the rows' object refs alive for restarts
        self.shards_ = [actor.remote(part, self.index, self.index_params) for part in self._parts]
        self.infos_ = ray.get([s.info.remote() for s in self.shards_])
        self.memory_offsets_ = np.concatenate([[0], np.cumsum([i["memory_rows"] for i in self.infos_])]).astype(np.int64)
        self.train_offsets_ = np.concatenate([[0], np.cumsum([i["train_rows"] for i in self.infos_])]).astype(np.int64)
        self.normalizer_ = ray.get(self.shards_[0].transform.remote())
        if self.memory_offsets_[-1] < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} rows in memory, got {self.memory_offsets_[-1]}")

    def _broadcast(self, chunks: Iterable[tuple[Any, int, int | None, np.ndarray | None]], k: int
                   ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Merged (dist, global memory row) per chunk of queries.

        Each chunk is (queries or their ObjectRef, rows, the shard holding them as memory rows or
        None, that shard's own leave-one-out (dist, local idx) for them). Two chunks are in flight at once.
        """
        pending: list[tuple[int, list[tuple[Any, int]], tuple | None]] = []

        def collect(item: tuple[int, list[tuple[Any, int]], tuple | None]) -> tuple[np.ndarray, np.ndarray]:
            m, futures, own = item
            results = [(d, i + self.memory_offsets_[s]) for (d, i), (_, s) in
                       zip(ray.get([f for f, _ in futures]), futures)]
            if own is not None:
                results.append(own)
            return merge_topk(results, m, k)

        for queries, m, owner, own in chunks:
            futures = [(shard.search.remote(queries, k), s) for s, shard in enumerate(self.shards_) if s != owner]
            pending.append((m, futures, None if own is None else (own[0], own[1] + self.memory_offsets_[owner])))
            if len(pending) > 1:
                yield collect(pending.pop(0))
        for item in pending:
            yield collect(item)

    def _memory_neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out k nearest of every memory row among all memory rows (global row numbers)."""
        dist_parts, idx_parts = [], []
        for s, shard in enumerate(self.shards_):
            n_s = self.infos_[s]["memory_rows"]
            if n_s == 0:
                continue
            own_d, own_i = ray.get(shard.search_self.remote(k))
            chunks = ((shard.rows.remote("memory", a, min(a + self.query_rows, n_s)), min(self.query_rows, n_s - a), s,
                       (own_d[a:a + self.query_rows], own_i[a:a + self.query_rows])) for a in range(0, n_s, self.query_rows))
            for d, i in self._broadcast(chunks, k):
                dist_parts.append(d)
                idx_parts.append(i)
        return np.concatenate(dist_parts), np.concatenate(idx_parts)

    def _training_scores(self, n: int) -> np.ndarray:
        """Every training row's score: leave-one-out for memory rows, a plain search for rows dropped by clean."""
        scores = np.empty(n, dtype=np.float32)
        scores[self.kept_] = knn_score(self._memory_neighbours(self.k)[0])
        dropped_scores = []
        for s, shard in enumerate(self.shards_):
            n_d = self.infos_[s]["train_rows"] - self.infos_[s]["memory_rows"]
            chunks = ((shard.rows.remote("dropped", a, min(a + self.query_rows, n_d)), min(self.query_rows, n_d - a),
                       None, None) for a in range(0, n_d, self.query_rows))
            dropped_scores += [knn_score(d) for d, _ in self._broadcast(chunks, self.k)]
        if dropped_scores:
            scores[np.setdiff1d(np.arange(n), self.kept_)] = np.concatenate(dropped_scores)
        return scores

    def _set_threshold(self) -> None:
        self.threshold_ = training_threshold(self.train_scores_, self.kept_, fpr=self.fpr,
                                             contamination=self.contamination)  # exactly KNNDetector's rule
        self.offset_ = -self.threshold_

    # -- scoring ---------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "shards_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def search(self, X: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest memory rows of each query over all shards: (dist, global memory row numbers)."""
        self._check_fitted()
        X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32, reset=False))
        Q = self.normalizer_.transform(X)
        if len(Q) == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        chunks = ((ray.put(np.ascontiguousarray(Q[a:a + self.query_rows])), len(Q[a:a + self.query_rows]), None, None)
                  for a in range(0, len(Q), self.query_rows))
        parts = list(self._broadcast(chunks, k))
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def anomaly_score(self, X: Any) -> np.ndarray:
        """The paper's d(y): mean distance to the k nearest training embeddings over all shards (float64)."""
        return knn_score(self.search(X, self.k)[0]).astype(np.float64)

    def nearest(self, X: Any, n: int = 3) -> list[list[tuple[str, float]]]:
        """The ``n`` nearest training items (name, distance) of each query, as :meth:`dn2.KNNDetector.nearest`."""
        validate("nearest", {"n": n}, {"n": [Interval(int, 1, None)]})
        self._check_fitted()
        dist, idx = self.search(X, min(n, int(self.memory_offsets_[-1])))
        owner = np.searchsorted(self.memory_offsets_, idx, side="right") - 1
        names: dict[int, str] = {}
        for s in np.unique(owner):
            rows = np.unique(idx[owner == s])
            names.update(zip(rows.tolist(), ray.get(self.shards_[s].names_of.remote(rows - self.memory_offsets_[s]))))
        return [[(names[int(j)], float(d)) for d, j in zip(drow, irow)] for drow, irow in zip(dist, idx)]

    # -- persistence -----------------------------------------------------------------------------------

    def to_detector(self) -> KNNDetector:
        """The fitted single-machine :class:`dn2.KNNDetector` (gathers the memory bank on the driver)."""
        self._check_fitted()
        parts = ray.get([s.memory.remote() for s in self.shards_])
        memory = np.concatenate([m for m, _ in parts])
        names = [n for _, ns in parts for n in ns]
        header, tensors = detector_state(self.local_detector().get_params(), memory, names, self.threshold_,
                                         self.train_scores_, self.kept_, self.normalizer_)
        return KNNDetector.from_state(header, tensors)

    def save_manifest(self, path: str | os.PathLike, *, model: dict[str, Any] | None = None,
                      force: bool = False) -> Path:
        """Write one model file per shard (by the shard's actor) and a JSON manifest listing them with sha256.

        ``path`` ends in ``.json``; the shard files go beside it (``<stem>.shard-0000-of-0004.dn2``),
        so the folder must be shared storage on a cluster. ``model``: the image model's fields
        (preset, method, backbone) for a DN2 manifest. Nothing is overwritten without ``force``.
        """
        self._check_fitted()
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise ValueError(f"{printable(path)}: a manifest's name ends in .json")
        check_output_path(path, force=force, what="model manifest")
        n = len(self.shards_)
        files = [path.with_name(f"{path.stem}.shard-{s:04d}-of-{n:04d}.dn2") for s in range(n)]
        for f in files:
            check_output_path(f, force=force, what="model shard")
        params = self.local_detector().get_params()
        digests = ray.get([
            shard.save.remote(str(f.resolve()), params, self.threshold_,
                              self.train_scores_[self.train_offsets_[s]:self.train_offsets_[s + 1]], force)
            for s, (shard, f) in enumerate(zip(self.shards_, files))])
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "DN2" if model else "KNNDetector",
            "detector": {"params": params, "threshold": self.threshold_, "n_features_in": self.n_features_in_},
            "shards": [{"file": f.name, "sha256": d, "memory_rows": int(i["memory_rows"]),
                        "train_rows": int(i["train_rows"])} for f, d, i in zip(files, digests, self.infos_)],
        }
        if model:
            manifest["model"] = model
        with atomic_path(path, force=force, what="model manifest") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return path

    def shutdown(self) -> None:
        """End the shard actors (they also end with the Ray session)."""
        for shard in getattr(self, "shards_", []):
            ray.kill(shard)
        self.shards_ = []


_SHARD_FILE = re.compile(r"[^/\\]+\.dn2")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked JSON of a manifest written by :meth:`ShardedKNNDetector.save_manifest`.

    ValueError naming the file for anything else: too large, not JSON, another format or version,
    shard entries that are not a plain file name beside the manifest with a sha256.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {manifest.get('version')!r}; this dn2 reads version {MANIFEST_VERSION}")
        detector, shards = manifest["detector"], manifest["shards"]
        if not isinstance(detector.get("params"), dict) or not isinstance(shards, list) or not shards:
            raise ValueError("no detector parameters, or no shards listed")
        for entry in shards:
            if (not isinstance(entry, dict) or not _SHARD_FILE.fullmatch(str(entry.get("file", "")))
                    or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", "")))):
                raise ValueError(f"bad shard entry {entry!r}: a file name beside the manifest and its sha256")
        float(detector["threshold"]), int(detector["n_features_in"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{printable(path)}: not a valid dn2 sharded model manifest ({error})") from None
    return manifest


def load_manifest(path: str | os.PathLike, *, cpus_per_shard: float | None = None, max_restarts: int = 3,
                  query_rows: int = 8192) -> tuple[ShardedKNNDetector, dict[str, Any] | None]:
    """Put the shards of a manifest written by :meth:`ShardedKNNDetector.save_manifest` on Ray actors.

    Returns the fitted detector and, for a DN2 manifest, its image model's fields (preset, method,
    backbone). Each actor checks its file's sha256 against the manifest and loads it with
    :func:`dn2.load` (no pickle, every field validated). ``cpus_per_shard`` None shares the cluster's
    CPUs out over the shards (:func:`share_cpus`). Needs an open Ray session.
    """
    path = Path(path)
    manifest = read_manifest(path)
    detector, shards = manifest["detector"], manifest["shards"]
    try:
        params = {name: detector["params"][name] for name in _SHARED_PARAMS}
        if isinstance(params["blocks"], list):
            params["blocks"] = tuple(params["blocks"])
        det = ShardedKNNDetector(**params, n_shards=len(shards), cpus_per_shard=cpus_per_shard or share_cpus(len(shards)),
                                 max_restarts=max_restarts, query_rows=query_rows)
        det.check_params()
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{printable(path)}: invalid detector parameters in the manifest ({error})") from None
    det._start([ModelFilePart(str((path.parent / e["file"]).resolve()), e["sha256"]) for e in shards])
    for entry, info in zip(shards, det.infos_):
        if info["params"] != det.local_detector().get_params() or info["memory_rows"] != entry.get("memory_rows"):
            det.shutdown()
            raise ValueError(f"{printable(path)}: shard {entry['file']} does not match the manifest")
    det.n_features_in_ = int(detector["n_features_in"])
    det.threshold_ = float(detector["threshold"])
    det.offset_ = -det.threshold_
    det.train_scores_ = np.concatenate([i["train_scores"] for i in det.infos_])
    det.kept_ = np.concatenate([i["keep"] + a for i, a in zip(det.infos_, det.train_offsets_)])
    return det, manifest.get("model")
