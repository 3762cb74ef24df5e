"""What ``dn2 fit --ray`` and ``dn2 score --ray`` run: embed on Ray, then fit or score over index shards.

The command line (:mod:`dn2.cli`) parses the options and calls :func:`fit` or :func:`score` here.
``--ray`` alone starts a local Ray for the run; ``--ray auto`` or ``--ray ray://host:10001`` uses
a running cluster. Embeddings go to ``--ray-embeddings DIR`` (kept: a rerun resumes there) or to
a temporary folder beside the output, removed at the end.

Example (shell):
    dn2 fit normal/ -o parts.dn2 --ray --ray-workers 2
    dn2 score parts.dn2 new/ --csv scores.csv --ray
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import ray

from ..backbones import backbone_status
from ..detector import DN2, load
from ..features import backbone_names
from ..images import BadImageError, printable
from ..modelfile import ModelFileError
from ..settings import Method
from .embed import EmbeddingRun, embed_to_parquet, iter_embeddings, method_embedder, method_of
from .session import ray_session
from .sharded import ShardedKNNDetector, load_manifest, read_manifest, share_cpus

__all__ = ["Scored", "fit", "score"]


class Scored(NamedTuple):
    """What ``dn2 score`` prints: names, scores, nearest neighbours (or None), skipped images, threshold."""

    names: list[str]
    scores: np.ndarray
    neighbours: list[list[tuple[str, float]]] | None
    skipped: list[str]
    threshold: float


def _address(args: argparse.Namespace) -> str | None:
    return None if args.ray == "local" else args.ray


@contextlib.contextmanager
def _embedding_folder(args: argparse.Namespace, beside: Path) -> Iterator[Path]:
    """``--ray-embeddings DIR`` (kept), or a temporary folder removed afterwards: in the system's
    temporary folder for a local Ray, beside the output on a cluster (where the output is on
    storage every node shares, so is that)."""
    if args.ray_embeddings:
        yield Path(args.ray_embeddings)
        return
    local = _address(args) is None
    folder = Path(tempfile.mkdtemp(prefix=".dn2-embeddings-", dir=None if local else beside))
    try:
        yield folder / "shards"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _embed(args: argparse.Namespace, images: Any, folder: Path, method: Method) -> EmbeddingRun:
    run = embed_to_parquet(images, folder, method, weights=args.weights, runtime=args.runtime,
                           workers=args.ray_workers, batch_size=args.batch_size, num_workers=args.workers or 0,
                           progress=not args.quiet)
    if run.bad and not args.skip_bad:
        first = next(s for emb in iter_embeddings(folder) for s in emb.skipped)
        raise BadImageError(f"{first} ({run.bad} bad image(s); --skip-bad to go on without them)")
    return run


def _check_runs_on_ray(method: Method, *, scoring: bool = False) -> None:
    """``ValueError`` for what the Ray path does not do: int8 (the quantised networks stay on the driver)
    and anomaly maps (made on one machine, from the images themselves); a model with maps whose image
    score is the image-level one scores on Ray without its maps."""
    if method.precision == "int8":
        raise ValueError("--ray does not run precision int8 (the quantised network is made and kept on one "
                         "machine): run without --ray, or with --precision fp32/bf16")
    if method.maps is not None and (not scoring or method.image_score != "dn2"):
        raise ValueError("--ray makes image-level scores only: a model with anomaly maps (--maps) is fitted, and "
                         "one judged by its maps (--image-score) is scored, without --ray")


def fit(model: DN2, args: argparse.Namespace, out: Path) -> int:
    """``dn2 fit --ray``: embed on Ray, fit a :class:`~dn2.ray.ShardedKNNDetector`, save; the number of
    skipped images. ``model`` holds the checked settings; it is saved fitted unless ``--ray-manifest``."""
    if model.n_centres is not None:
        raise ValueError("--n-centres makes a memory bank that fits one machine: fit it without --ray")
    if args.ray_manifest and out.suffix.lower() != ".json":
        raise ValueError(f"{printable(out)}: with --ray-manifest the output is a manifest, named *.json")
    if args.ray_shards is not None and args.ray_shards < 1:
        raise ValueError(f"--ray-shards must be at least 1, got {args.ray_shards}")
    if model.thumbnails:
        raise ValueError("--thumbnails reads every training image again on the driver: fit it without --ray")
    method = method_of(model)
    _check_runs_on_ray(method)
    with ray_session(_address(args), num_cpus=None), _embedding_folder(args, out.parent) as folder:
        run = _embed(args, args.images if len(args.images) > 1 else args.images[0], folder, method)
        n_shards = args.ray_shards or args.ray_workers or int(ray.cluster_resources().get("CPU", 1))
        parts = run.identity.get("parts")
        det = ShardedKNNDetector(k=method.k, normalize=method.normalize, clean=model.clean,
                                 contamination=model.contamination, fpr=model.fpr, index=model.index,
                                 index_params=model.index_params,
                                 blocks=tuple(p["feature_dim"] for p in parts) if parts else None,
                                 n_shards=n_shards, cpus_per_shard=share_cpus(n_shards)).fit(folder)
        skipped = [s for emb in iter_embeddings(folder) for s in emb.skipped]
        if args.ray_manifest:
            det.save_manifest(out, model={"preset": model.preset, "method": method.to_dict(), "backbone": run.identity},
                              force=args.force)
        else:
            # A DN2 fitted from parts: the fitted attributes DN2.fit sets, then DN2's own save.
            model.method_ = method
            model.embedder_ = method_embedder(method, weights=args.weights, runtime=args.runtime).fit()
            model.detector_ = det.to_detector().set_params(seed=model.seed, novelty=model.novelty)
            model.skipped_ = skipped
            model.save(out, force=args.force)
        n_memory, n_train = int(det.memory_offsets_[-1]), len(det.train_scores_)
        det.shutdown()
    print(f"fitted on {len(det.kept_)} of {n_train} images ({n_memory} embeddings kept, {n_shards} shards), "
          f"threshold {det.threshold_:.4f}; saved {out}")
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    return len(skipped)


def _manifest_method(path: Path, model: dict[str, Any] | None, args: argparse.Namespace) -> Method:
    """The method of a DN2 manifest, with its backbone checked as :func:`dn2.load` checks a model file's."""
    if not isinstance(model, dict):
        raise ModelFileError(path, "the manifest holds a detector on embeddings, not an image model")
    try:
        method = Method.from_dict(model["method"])
        stored = model["backbone"]
    except (KeyError, ValueError, TypeError) as error:
        raise ModelFileError(path, f"invalid image model in the manifest: {error}") from None
    weights = args.weights or ("random" if stored.get("weights_id") == "random:0" else None)
    if weights is None and not args.allow_download:
        for name in backbone_names(method.backbone):
            if backbone_status(name) == "download":
                raise ModelFileError(path, f"the weights of backbone {name!r} are not on this machine; pass "
                                     "--weights FILE, or --allow-download")
    ours = method_embedder(method, weights=weights, runtime=args.runtime).fit().identity()
    if ours != stored:
        raise ModelFileError(path, "backbone mismatch: the model was fitted with a different backbone or weights; "
                             "pass the original weights with --weights FILE")
    args.weights = weights
    return method


def _scoring_method(method: Method, args: argparse.Namespace) -> Method:
    if args.precision is None or args.precision == method.precision:
        return method
    warnings.warn(f"the model's embeddings were made in {method.precision}; scoring in {args.precision} shifts the "
                  "scores slightly against the threshold", UserWarning, stacklevel=2)
    return replace(method, precision=args.precision)


def score(args: argparse.Namespace) -> Scored:
    """``dn2 score --ray``: embed on Ray, score against a model file (searched on the driver) or a
    manifest (searched over shard actors)."""
    path = Path(args.model)
    sharded = path.suffix.lower() == ".json"
    with ray_session(_address(args), num_cpus=None):
        if sharded:
            manifest = read_manifest(path)
            method = _manifest_method(path, manifest.get("model"), args)
        else:
            loaded = load(path, weights=args.weights, allow_download=args.allow_download, runtime=args.runtime)
            if not isinstance(loaded, DN2):
                raise ValueError(f"{args.model} holds a detector on embeddings, not an image model")
            detector, method = loaded.detector, loaded.method_
        method = _scoring_method(method, args)
        _check_runs_on_ray(method, scoring=True)
        with _embedding_folder(args, Path(args.csv).resolve().parent if args.csv else Path.cwd()) as folder:
            # Embedding first, then the shards: actors hold their CPUs while they live.
            _embed(args, args.images if len(args.images) > 1 else args.images[0], folder, method)
            if sharded:
                detector = load_manifest(path)[0]
            names: list[str] = []
            scores, neighbours, skipped = [], [] if args.explain else None, []
            for emb in iter_embeddings(folder):  # one shard at a time: bounded memory
                names += emb.names
                skipped += emb.skipped
                if len(emb.vectors):
                    scores.append(detector.anomaly_score(emb.vectors))
                    if neighbours is not None:
                        neighbours += detector.nearest(emb.vectors, args.explain)
        threshold = detector.threshold_
        if isinstance(detector, ShardedKNNDetector):
            detector.shutdown()
    return Scored(names, np.concatenate(scores) if scores else np.empty(0), neighbours, skipped, threshold)

