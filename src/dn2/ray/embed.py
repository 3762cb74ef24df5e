"""Distributed embedding: Ray Data runs a pool of embedder actors over shards of the input.

The input (see :mod:`dn2.ray.inputs`) is cut, in its order, into shards of ``shard_rows``
images; shard ``i`` is written to ``part-{i:06d}-of-{n:06d}.parquet`` in the output folder, with
one row per image: ``index`` (position in the input), ``name``, ``embedding`` (float32, null for a
bad image) and ``error`` (null, or why the image could not be used). So:

- a bad image is a row with an error message, never a lost batch;
- each shard file appears at once, complete (written under a temporary name, then renamed), so a
  rerun skips the shards already written and embeds only the rest;
- a worker that dies (killed, out of memory, node lost) is restarted by Ray (``max_restarts``) and
  its shard is retried (``max_task_retries``); a shard written twice is written identically.

Each actor loads the model once (:class:`dn2.Embedder` with the method's settings; the runtime
and precision choice inside it as on one machine) and embeds whole shards, decoding in-process
(``num_workers`` decoding processes per actor if asked). ``dn2-embeddings.json`` in the folder
records what was embedded (method, backbone identity, input names digest, shard size): a rerun
with other inputs or another model is refused rather than mixed in.

Example:
    >>> shard_name(3, 12)
    'part-000003-of-000012.parquet'
    >>> error_rows(["a", "b", "c"], ["a", "c"], ["b: not an image"])
    [None, 'b: not an image', None]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from tqdm.auto import tqdm

from ..datasets import SubsetSource
from ..detector import DN2
from ..features import Embedder, Embeddings
from ..images import ImageSource, printable
from ..outputs import atomic_path, check_output_path
from ..runtime import resolve_precision
from ..settings import Method
from .inputs import image_source
from .session import ray_session

__all__ = [
    "META_NAME", "SHARD_ROWS", "EmbeddingRun", "embed_to_parquet", "error_rows", "iter_embeddings", "method_embedder",
    "method_of", "read_embeddings", "shard_files", "shard_name",
]

SHARD_ROWS = 1024  # images per shard: ~10 MB of embeddings at D=2560, 20-40 s of one CPU worker; the unit of retry
META_NAME = "dn2-embeddings.json"
META_FORMAT = "dn2-embeddings"
META_VERSION = 1
_TMP_PREFIX = ".dn2-"  # dn2.outputs.atomic_path's temporary names: left behind only by a killed writer


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` of ``n``: fixed by the input order, so a rerun finds what is done."""
    return f"part-{i:06d}-of-{n:06d}.parquet"


def method_of(model: DN2) -> Method:
    """The method a :class:`dn2.DN2` embeds with: its fitted ``method_``, or its settings with the
    precision resolved for this machine exactly as ``fit`` resolves it."""
    if hasattr(model, "method_"):
        return model.method_
    method = model.method()
    return replace(method, precision=resolve_precision(method.extraction_precision(), model.runtime))


def method_embedder(method: Method, *, weights: str | os.PathLike | None = None, runtime: str = "auto",
                    batch_size: int | None = None, num_workers: int = 0) -> Embedder:
    """The :class:`dn2.Embedder` computing ``method``'s embeddings, as :class:`dn2.DN2` builds it; bad
    images are skipped (the pipeline records them as rows) and there is no progress bar."""
    return Embedder(backbone=method.backbone, weights=weights, stages=method.stages, flip=method.flip,
                    precision=method.precision, runtime=runtime, batch_size=batch_size, num_workers=num_workers,
                    progress=False, skip_bad=True)


def error_rows(names: Sequence[str], good: Sequence[str], messages: Sequence[str]) -> list[str | None]:
    """Per input row: None if it was embedded, else its error message.

    ``good`` and ``messages`` are an :class:`dn2.Embeddings`' ``names`` and ``skipped`` for those
    ``names``: both in input order, so the good names are matched in order and every other row takes
    the next message. (Two rows of the same file both fail or both succeed, so repeated names match.)
    """
    out: list[str | None] = []
    j = m = 0
    for name in names:
        if j < len(good) and good[j] == name:
            out.append(None)
            j += 1
        else:
            if m >= len(messages):
                raise RuntimeError(f"embedding lost image {name!r} without an error message")
            out.append(messages[m])
            m += 1
    if j != len(good) or m != len(messages):
        raise RuntimeError("embeddings do not match the shard's images")
    return out


def _shard_table(start: int, names: list[str], vectors: np.ndarray, errors: list[str | None], dim: int) -> pa.Table:
    """One shard as an Arrow table: index, name, embedding (fixed-size float32 list, null if bad), error."""
    n = len(names)
    ok = np.array([e is None for e in errors], dtype=bool)
    flat = np.zeros((n, dim), dtype=np.float32)
    flat[ok] = vectors
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(~ok))
    return pa.table({
        "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "name": pa.array(names, type=pa.string()),
        "embedding": embedding,
        "error": pa.array(errors, type=pa.string()),
    })


class ShardEmbedder:
    """The callable class Ray Data runs on each actor of the pool: one model load, then whole shards.

    ``__call__`` takes a batch of shard numbers and returns one summary row per shard (rows, bad
    images, seconds, whether it was already written). Exceptions other than bad images (e.g. the
    model cannot be loaded on this node) fail the run with Ray's error.
    """

    def __init__(self, source: ImageSource, folder: str, n_images: int, shard_rows: int, method: dict[str, Any],
                 identity: dict[str, Any], weights: str | None, runtime: str, batch_size: int | None,
                 num_workers: int) -> None:
        self.source, self.folder = source, Path(folder)
        self.n_images, self.shard_rows = n_images, shard_rows
        self.n_shards = -(-n_images // shard_rows)
        self.embedder = method_embedder(Method.from_dict(method), weights=weights, runtime=runtime,
                                        batch_size=batch_size, num_workers=num_workers).fit()
        if self.embedder.identity() != identity:
            raise RuntimeError(f"the backbone on this node ({self.embedder.identity()}) differs from the driver's "
                               f"({identity}): install the same weights everywhere, or pass weights on shared storage")
        self.dim = int(identity["feature_dim"])

    def embed_shard(self, i: int) -> dict[str, Any]:
        """Write shard ``i`` unless it exists; its summary."""
        path = self.folder / shard_name(i, self.n_shards)
        t0 = time.perf_counter()
        if path.exists():
            return {"shard": i, "rows": pq.read_metadata(path).num_rows, "bad": -1, "seconds": 0.0, "written": False}
        start, stop = i * self.shard_rows, min(self.n_images, (i + 1) * self.shard_rows)
        part = SubsetSource(self.source, np.arange(start, stop))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each bad image is recorded in its row, not warned about
            emb = self.embedder.embed(part)
        names = part.names()
        errors = error_rows(names, emb.names, emb.skipped)
        table = _shard_table(start, names, emb.vectors, errors, self.dim)
        try:
            with atomic_path(path, what="embedding shard") as tmp:
                pq.write_table(table, tmp)
        except FileExistsError:  # another attempt at this shard finished first: the same rows
            pass
        return {"shard": i, "rows": stop - start, "bad": len(emb.skipped), "seconds": time.perf_counter() - t0,
                "written": True}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [self.embed_shard(int(i)) for i in batch["shard"]]
        return {key: [r[key] for r in rows] for key in rows[0]}


@dataclass
class EmbeddingRun:
    """What :func:`embed_to_parquet` did: the folder, its shards, how many were written now, bad images,
    the embedding width, the wall time, the backbone identity (:meth:`dn2.Embedder.identity`) and the
    actors' busy time (per image: the steady cost, start-up excluded)."""

    folder: Path
    n_images: int
    n_shards: int
    written: int
    bad: int
    dim: int
    seconds: float
    identity: dict[str, Any]
    busy_seconds: float = 0.0  # the actors' time on the shards written now (no start-up, no waiting)


def _names_digest(source: ImageSource) -> str:
    """The inputs' identity for resuming: their names, in order (files changed in place are not noticed)."""
    h = hashlib.sha256()
    for name in source.names():
        h.update(name.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META_NAME
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{printable(path)}: not a dn2 embeddings record ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise ValueError(f"{printable(path)}: not a dn2 embeddings record of version {META_VERSION}")
    return meta


def _prepare_folder(folder: Path, meta: dict[str, Any]) -> None:
    """Create the folder or check that it holds this very run's shards; write the record once."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{printable(folder)}: not a folder (embedding output)")
    if not folder.exists():
        check_output_path(folder, what="embedding folder")  # its parent exists and is writable
        folder.mkdir()
    old = _read_meta(folder)
    if old is None:
        strangers = [p.name for p in folder.iterdir() if not p.name.startswith(_TMP_PREFIX)]
        if strangers:
            raise ValueError(f"{printable(folder)}: holds other files ({printable(strangers[0])}, ...); "
                             "give an empty or new folder for the embeddings")
        with atomic_path(folder / META_NAME, what="embeddings record") as tmp:
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    elif old != meta:
        changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        raise ValueError(f"{printable(folder)}: holds embeddings of other inputs or another model (differs in "
                         f"{', '.join(changed)}); give a new folder, or remove this one to start again")


def embed_to_parquet(
    images: Any,
    folder: str | os.PathLike,
    method: Method,
    *,
    weights: str | os.PathLike | None = None,
    runtime: str = "auto",
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    batch_size: int | None = None,
    num_workers: int = 0,
    shard_rows: int = SHARD_ROWS,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    progress: bool = True,
) -> EmbeddingRun:
    """Embed ``images`` on Ray into Parquet shards in ``folder``; shards already there are skipped.

    ``method``: what to compute (:func:`method_of` a :class:`dn2.DN2`; its precision must be
    resolved, not "auto", so every node computes the same). ``workers`` embedder actors (default:
    the cluster's CPUs / ``cpus_per_worker``), each with ``cpus_per_worker`` CPUs (its inference
    threads) and ``gpus_per_worker`` GPUs (reserved for it by Ray; dn2's runtimes run on the CPU
    today). ``weights``: a weights file every node can read (shared storage). A dead actor is
    restarted up to ``max_restarts`` times, a shard retried up to ``max_task_retries`` times.
    Runs inside :func:`dn2.ray.ray_session` (a local Ray is started if none is open).
    """
    if method.precision not in ("fp32", "bf16"):
        raise ValueError(f"method.precision must be fp32 or bf16 (resolved, so that every node computes the same: "
                         f"dn2.ray.method_of(model); int8 networks are not shipped to the actors), got {method.precision!r}")
    for name, value, low in (("shard_rows", shard_rows, 1), ("workers", workers, 1), ("num_workers", num_workers, 0),
                             ("max_restarts", max_restarts, 0), ("max_task_retries", max_task_retries, 0)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    t0 = time.perf_counter()
    folder = Path(folder)
    source = image_source(images)
    n = len(source)
    identity = method_embedder(method, weights=weights, runtime=runtime).fit().identity()
    n_shards = -(-n // shard_rows)
    meta = {"format": META_FORMAT, "version": META_VERSION, "n_images": n, "shard_rows": shard_rows,
            "n_shards": n_shards, "names_sha256": _names_digest(source), "method": method.to_dict(),
            "backbone": identity}
    _prepare_folder(folder, meta)
    todo = [i for i in range(n_shards) if not (folder / shard_name(i, n_shards)).exists()]
    written, busy = 0, 0.0
    if todo:
        with ray_session():
            written, busy = _run_pipeline(source, folder, todo, n_shards, meta, weights, runtime, workers, cpus_per_worker,
                                    gpus_per_worker, batch_size, num_workers, max_restarts, max_task_retries, progress)
    files = shard_files(folder)  # every shard is there, or this raises
    for stale in folder.glob(_TMP_PREFIX + "*.tmp"):  # temporary files of writers killed mid-write
        stale.unlink(missing_ok=True)
    good = sum(pq.read_table(f, columns=["error"]).column("error").null_count for f in files)
    return EmbeddingRun(folder, n, n_shards, written, n - good, int(identity["feature_dim"]), time.perf_counter() - t0,
                        identity, busy)


def _run_pipeline(source: ImageSource, folder: Path, todo: list[int], n_shards: int, meta: dict[str, Any],
                  weights: Any, runtime: str, workers: int | None, cpus: float, gpus: float, batch_size: int | None,
                  num_workers: int, max_restarts: int, max_task_retries: int, progress: bool) -> tuple[int, float]:
    """Run the actor pool over the shards ``todo``; progress over completed shards. Returns the shards
    written and the actors' seconds spent on them."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar over shards instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per execution
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1e-9)))
    workers = min(workers, len(todo))
    # One shard per block: each actor call embeds one shard, and a retry redoes one shard only.
    items = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for these and warns that passing them is deprecated (to go
        # in 2.64, hence the extra's upper bound); its own default, retrying forever, would loop on an
        # image that kills its decoder every time instead of failing the run.
        warnings.simplefilter("ignore", DeprecationWarning)
        results = items.map_batches(
            ShardEmbedder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs=dict(source=source, folder=str(folder.resolve()), n_images=meta["n_images"],
                                       shard_rows=meta["shard_rows"], method=meta["method"], identity=meta["backbone"],
                                       weights=None if weights is None else os.fspath(weights), runtime=runtime,
                                       batch_size=batch_size, num_workers=num_workers),
            num_cpus=cpus,
            num_gpus=gpus or None,
            max_restarts=max_restarts,  # a dead actor is restarted ...
            max_task_retries=max_task_retries,  # ... and its shard retried
        )
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), unit="shard", desc="embedding (ray)",
               disable=not progress, file=sys.stderr)
    written, busy = 0, 0.0
    for row in results.iter_rows():
        written += int(row["written"])
        busy += float(row["seconds"])
        bar.update(1)
    bar.close()
    return written, busy


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of an embedding folder in input order; ValueError if any is missing."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise ValueError(f"{printable(folder)}: no {META_NAME}: not a folder written by dn2.ray.embed_to_parquet")
    n = meta["n_shards"]
    files = [folder / shard_name(i, n) for i in range(n)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"{printable(folder)}: {len(missing)} of {n} shards missing (first {missing[0]}); "
                         "run the embedding again to complete it")
    return files


def read_shard(path: str | os.PathLike) -> tuple[Embeddings, np.ndarray]:
    """One shard file as (Embeddings of its good rows, with the bad ones' messages in ``skipped``;
    the input positions of the good rows)."""
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    ok = column.is_valid().to_numpy(zero_copy_only=False)
    dim = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False)[column.offset * dim:(column.offset + len(column)) * dim]
    vectors = np.ascontiguousarray(values.reshape(-1, dim)[ok], dtype=np.float32)
    names = table.column("name").to_pylist()
    errors = table.column("error").to_pylist()
    index = table.column("index").to_numpy()
    return Embeddings(vectors, [nm for nm, good in zip(names, ok) if good], [e for e in errors if e is not None]), index[ok]


def iter_embeddings(folder: str | os.PathLike) -> Iterator[Embeddings]:
    """The embeddings of a folder shard by shard, in input order (bounded memory)."""
    for path in shard_files(folder):
        yield read_shard(path)[0]


def read_embeddings(folder: str | os.PathLike) -> Embeddings:
    """All embeddings of a folder in input order (bad images left out, their messages in ``skipped``),
    as one :class:`dn2.Embeddings`, as :meth:`dn2.Embedder.embed` with ``skip_bad`` returns them."""
    parts = list(iter_embeddings(folder))
    dim = pq.read_schema(shard_files(folder)[0]).field("embedding").type.list_size
    vectors = np.concatenate([p.vectors for p in parts]) if parts else np.empty((0, dim), np.float32)
    return Embeddings(vectors, [n for p in parts for n in p.names], [s for p in parts for s in p.skipped])
