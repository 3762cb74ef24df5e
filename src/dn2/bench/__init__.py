"""Benchmarks: the DN2 paper's protocols on embeddings of labelled datasets (``dn2 bench``).

:mod:`dn2.bench.data` embeds a dataset once per backbone (cached), :mod:`dn2.bench.protocols`
holds the protocols as a registry of pure functions over embeddings, and :mod:`dn2.bench.report`
writes their tables (console, CSV, markdown, PNG, HTML). The command line lives in :mod:`dn2.cli`.

Example::

    dn2 bench unimodal --data ../shared/datasets/cifar10-jpeg.zip --max-train-per-class 50 --max-test 500
    dn2 bench all --data cifar10.zip --report bench-report/
"""

from .data import PAPER, BenchData, embed_dataset, limit_dataset, normalized, paper_numbers
from .protocols import (
    PROTOCOLS,
    Protocol,
    backbones,
    class_knn,
    fewshot,
    group,
    impurity,
    kmeans_centres,
    multimodal,
    neighbours,
    rocauc,
    run_protocols,
    set_task,
    unimodal,
)

__all__ = [
    "PAPER", "PROTOCOLS", "BenchData", "Protocol", "backbones", "class_knn", "embed_dataset", "fewshot", "group",
    "impurity", "kmeans_centres", "limit_dataset", "multimodal", "neighbours", "normalized", "paper_numbers", "rocauc",
    "run_protocols", "set_task", "unimodal",
]
