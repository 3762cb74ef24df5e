"""Embedding cache: benchmark sweeps embed each dataset once per backbone, then reuse it.

An entry is keyed by what determines the embeddings: the backbone's identity (name, weights
hash, preprocessing), the precision, and a fingerprint of the images, which each image source
computes itself (:meth:`dn2.images.ImageSource.fingerprint`: path + size + mtime for image files,
the archive's bytes and member list for a zip, so a re-copied dataset archive still hits; the
pixel bytes for arrays and PIL images). Entries are model-format
files (safetensors + JSON, see :mod:`dn2.modelfile`): no pickle, integrity-checked on read.

Example:
    >>> from dn2 import Embedder
    >>> from dn2.cache import cached_embed
    >>> emb = cached_embed(Embedder(progress=False), "images/")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .features import Embedder, Embeddings, backbone_names
from .runtime import resolve_precision
from . import runtime
from .images import ImageSource, as_source
from .modelfile import ModelFileError, read_model, write_model


def default_cache_dir() -> Path:
    """``$DN2_CACHE`` or ``~/.cache/dn2/embeddings``."""
    return Path(os.environ.get("DN2_CACHE") or Path.home() / ".cache" / "dn2" / "embeddings")


def fingerprint(source: ImageSource) -> str:
    """A digest that changes when the images (or their order) change: ``source.fingerprint()``.

    Each kind of source knows how to fingerprint itself (files by path + size + mtime, a zip
    archive by its bytes and member list, arrays by their bytes, ...; see :mod:`dn2.images`).
    """
    return source.fingerprint()


def cache_key(embedder: Embedder, source: ImageSource) -> str:
    """The entry name: backbone identity + precision (+ runtime for bf16) + image fingerprint.

    fp32 runtimes agree to ~1e-6 and share entries; bf16 runtimes round differently, so a bf16 entry
    also names its runtime and the pieces its guard keeps in fp32. An int8 entry is keyed by its
    quantised network, which is part of the embedder's identity.
    """
    precision = resolve_precision(embedder.precision, embedder.runtime)
    key: dict[str, Any] = {
        "backbone": embedder.identity(),
        "precision": precision,
        "images": fingerprint(source),
    }
    if precision == "bf16":
        key["runtime"] = runtime.resolve_runtime(embedder.runtime, precision)
        key["fp32_parts"] = list(runtime.BF16_FP32_PARTS)  # what the bf16 guard keeps in fp32
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cached_embed(embedder: Embedder, images: Any, cache_dir: str | os.PathLike | None = None, *, use_cache: bool = True) -> Embeddings:
    """``embedder.embed(images)``, read from the cache when this exact embedding was made before."""
    source = as_source(images)
    if not use_cache:
        return embedder.embed(source)
    if len(backbone_names(embedder.backbone)) > 1:  # an ensemble: one entry per backbone, shared with single-backbone runs
        parts = [cached_embed(part, source, cache_dir) for part in embedder.parts()]
        return Embeddings(np.hstack([p.vectors for p in parts]), parts[0].names, parts[0].skipped)
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(embedder, source)}.dn2emb"
    if path.is_file():
        try:
            header, tensors = read_model(path)
            return Embeddings(tensors["vectors"], header["names"], header["skipped"])
        except (ModelFileError, KeyError):
            pass  # a damaged entry is recomputed and replaced
    emb = embedder.embed(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": "embeddings", "backbone": embedder.identity(), "names": emb.names, "skipped": emb.skipped}
    write_model(path, header, {"vectors": emb.vectors}, force=True)
    return emb
