"""DN2 on a Ray cluster: distributed embedding with Ray Data, kNN search over index shards on Ray actors.

For training sets and image collections that outgrow one machine (issue 15). Embedding is
embarrassingly parallel and dominates the cost: :func:`embed_to_parquet` runs a pool of embedder
actors over shards of the input (one model load per actor) and writes embeddings, names and
error messages as Parquet shards, resumable and retried by Ray. The search is the part that needs
care: :class:`ShardedKNNDetector` splits the memory bank over actors, each an index from
:mod:`dn2.search`, broadcasts queries and merges the shards' top-k with the search package's
running top-k merge, so scores, leave-one-out training scores and the threshold are exactly
those of the single-machine :class:`dn2.KNNDetector`.

Needs the ``ray`` extra (``pip install "dn2[ray]"``); ``import dn2`` works without it.

Modules: :mod:`~dn2.ray.session` (connecting to or starting Ray), :mod:`~dn2.ray.inputs` (image
inputs: folders, zips, files, Parquet/CSV manifests of paths on any pyarrow file system),
:mod:`~dn2.ray.embed` (the embedding pipeline and its Parquet shards), :mod:`~dn2.ray.sharded`
(the sharded detector, its manifest of per-shard model files), :mod:`~dn2.ray.commands` (what
``dn2 fit --ray`` and ``dn2 score --ray`` run).

Example:
    >>> import dn2, dn2.ray
    >>> with dn2.ray.ray_session(num_cpus=2):                                    # doctest: +SKIP
    ...     run = dn2.ray.embed_to_parquet("images/", "emb/", dn2.ray.method_of(dn2.DN2()), workers=2)
    ...     det = dn2.ray.ShardedKNNDetector(k=2, normalize="sqrt_l2", n_shards=2).fit(run.folder)
    ...     det.to_detector().save("parts.dn2")
"""

from __future__ import annotations

try:
    import pyarrow  # noqa: F401
    import ray  # noqa: F401
except ImportError as error:  # the optional extra is missing: say how to get it
    raise ImportError(f"dn2's Ray support needs the 'ray' extra: pip install \"dn2[ray]\" ({error})") from error

from .embed import EmbeddingRun, embed_to_parquet, iter_embeddings, method_embedder, method_of, read_embeddings, shard_files
from .inputs import ArrowFileSource, image_source
from .session import ray_session
from .sharded import ShardedKNNDetector, load_manifest

__all__ = [
    "ArrowFileSource",
    "EmbeddingRun",
    "ShardedKNNDetector",
    "embed_to_parquet",
    "image_source",
    "iter_embeddings",
    "load_manifest",
    "method_embedder",
    "method_of",
    "ray_session",
    "read_embeddings",
    "shard_files",
]
