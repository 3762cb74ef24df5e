"""The DN2 paper's evaluation protocols, on embeddings, and the ``dn2 bench`` command that runs them.

Every protocol is a pure function of a :class:`BenchData` (train/test embeddings and their class
labels) returning a :class:`~dn2.report.Table` of ROCAUC % values, so it runs in seconds on cached
embeddings and is tested without a network. ``dn2 bench`` embeds each split once per backbone
(through :mod:`dn2.cache`), runs the protocols and writes CSV, markdown, PNG and an HTML report.

Protocols (Bergman, Cohen & Hoshen 2020): :func:`unimodal` (Tables 1-4), :func:`multimodal`
(Table 5), :func:`fewshot` and :func:`impurity` (Fig. 5), :func:`neighbours` (Fig. 2),
:func:`backbones` (Fig. 1), :func:`kmeans_centres` (Table 6), :func:`group` and :func:`set_task`
(Fig. 4 and the covariance-trace set task).

Example:
    >>> import numpy as np
    >>> from dn2.bench import BenchData, unimodal
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(0, 10, (3, 8))
    >>> y_train, y_test = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    >>> data = BenchData("toy", ["a", "b", "c"], centres[y_train] + rng.normal(size=(60, 8)), y_train,
    ...                  centres[y_test] + rng.normal(size=(30, 8)), y_test)
    >>> unimodal(data, k=2).row("mean")["ROCAUC %"]
    100.0

Command line::

    dn2 bench unimodal --data ../shared/datasets/cifar10-jpeg.zip --max-train-per-class 50 --max-test 500
    dn2 bench all --data cifar10.zip --report bench-report/
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .backbones import DEFAULT_BACKBONE
from .datasets import FORMATS, LabelledDataset, Split, describe, load_dataset, subset
from .features import PRECISIONS, RUNTIMES, backbone_names
from .normalize import method_precision
from .group import SetDetector, covariance_trace
from .report import Plot, Table, format_table, write_html, write_table
from .search import kmeans, knn, knn_score
from .normalize import make_transform

__all__ = [
    "BenchData",
    "PROTOCOLS",
    "paper_numbers",
    "rocauc",
    "class_knn",
    "unimodal",
    "multimodal",
    "fewshot",
    "impurity",
    "neighbours",
    "backbones",
    "kmeans_centres",
    "group",
    "set_task",
    "limit_dataset",
    "embed_dataset",
    "normalized",
    "run_protocols",
    "add_bench_parser",
]

PROTOCOLS = ("unimodal", "multimodal", "fewshot", "impurity", "neighbours", "backbones", "kmeans", "group", "all")
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

SHOTS = (1, 2, 5, 10, 20, 50, 100, 500, None)  # None: all training images of the class
IMPURITY_FRACTIONS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20)
NEIGHBOURS = (1, 2, 3, 5, 10, 20, 50)
CENTRES = (1, 3, 5, 10)
GROUP_SIZES = tuple(range(2, 11))
POOLINGS = ("concat", "mean", "max")

# Mean ROCAUC % the paper reports (ResNet-101 features). Only these; the rest are figures.
PAPER = {
    "cifar10": {"unimodal": 92.5, "multimodal": 71.7},
    "fashion-mnist": {"unimodal": 94.4},
    "cifar100": {"unimodal": 89.3},
}
FIGURE_ONLY = "paper: figure only (no numbers to compare with)"

_BLOCK_BYTES = 128 * 2**20  # distance block per test chunk in the subset-based protocols


# ---------------------------------------------------------------------------------------------
# Data and small helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchData:
    """Embeddings of a labelled dataset: ``x_train[i]`` has class ``y_train[i]`` (index into ``classes``)."""

    name: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    backbone: str = ""
    blocks: tuple[int, ...] | None = None  # column counts per backbone of an ensemble embedding

    def __post_init__(self) -> None:
        self.x_train = np.ascontiguousarray(self.x_train, dtype=np.float32)
        self.x_test = np.ascontiguousarray(self.x_test, dtype=np.float32)
        self.y_train = np.asarray(self.y_train, dtype=np.int64).reshape(-1)
        self.y_test = np.asarray(self.y_test, dtype=np.int64).reshape(-1)
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("BenchData: each embedding needs exactly one label")
        if self.x_train.ndim != 2 or self.x_test.ndim != 2 or self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"BenchData: need 2-D embeddings of equal width, got {self.x_train.shape} and {self.x_test.shape}")

    def train_of(self, c: int) -> np.ndarray:
        """Training embeddings of class ``c``."""
        return self.x_train[self.y_train == c]

    def train_counts(self) -> np.ndarray:
        return np.bincount(self.y_train, minlength=len(self.classes))

    def describe(self) -> str:
        return f"{self.name}" + (f", {self.backbone}" if self.backbone else "")


def paper_numbers(data: BenchData) -> dict[str, float]:
    """The paper's mean ROCAUC % for this dataset ({} unless the name matches cifar10*, fashion-mnist*, cifar100*)."""
    name = re.sub(r"[^a-z0-9]", "", data.name.lower())
    if name.startswith("cifar100"):
        return PAPER["cifar100"] if len(data.classes) == 20 else {}  # the paper's 20 coarse classes
    if name.startswith("cifar10"):
        return PAPER["cifar10"]
    if name.startswith(("fashionmnist", "fmnist")):
        return PAPER["fashion-mnist"]
    return {}


def rocauc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """ROCAUC in % of anomaly scores (higher = more anomalous); NaN if only one kind is present."""
    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    if is_anomaly.all() or not is_anomaly.any():
        return float("nan")
    return float(100.0 * roc_auc_score(is_anomaly, scores))


def _mean(values: Sequence[float]) -> float:
    return float(np.nanmean(values)) if len(values) else float("nan")


def _std(values: Sequence[float]) -> float:
    return float(np.nanstd(values)) if len(values) > 1 else 0.0


def _mean_of_k_smallest(dist: np.ndarray, k: int) -> np.ndarray:
    """Row-wise mean of the k smallest values: the DN2 score from a full distance block."""
    if k < dist.shape[1]:
        dist = np.partition(dist, k - 1, axis=1)[:, :k]
    return dist.mean(axis=1, dtype=np.float64)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full Euclidean distance block (len(a), len(b)), float32, expanded around b's mean for accuracy."""
    ta, tb = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    with torch.inference_mode():
        centre = tb.mean(dim=0, dtype=torch.float64).to(torch.float32)
        ta, tb = ta - centre, tb - centre
        d2 = (ta @ tb.T).mul_(-2.0)
        d2.add_(ta.square().sum(1)[:, None]).add_(tb.square().sum(1)[None, :]).clamp_(min=0.0)
        return d2.sqrt_().numpy()


def _test_chunks(n_test: int, n_cols: int) -> Iterator[slice]:
    """Row slices of the test set so one (rows x n_cols) float32 block stays within _BLOCK_BYTES."""
    step = max(1, _BLOCK_BYTES // max(1, 4 * n_cols))
    for start in range(0, n_test, step):
        yield slice(start, min(start + step, n_test))


def class_knn(data: BenchData, k_max: int) -> np.ndarray:
    """Distances (n_test, n_classes, k_max) from each test embedding to its nearest training
    embeddings of each class, ascending, padded with inf where a class has fewer than k_max.

    Computed once, it gives unimodal, multimodal and every k <= k_max exactly: the k nearest
    among several classes are the k smallest of those classes' own k nearest.
    """
    out = np.full((len(data.x_test), len(data.classes), k_max), np.inf, dtype=np.float32)
    for c in range(len(data.classes)):
        train = data.train_of(c)
        if len(train):
            kk = min(k_max, len(train))
            out[:, c, :kk] = knn(train, data.x_test, kk)[0]
    return out


def _paper_column(table: Table, data: BenchData, protocol: str) -> None:
    """Append a 'paper %' column (value on the mean row) when the paper reports this dataset."""
    value = paper_numbers(data).get(protocol)
    if value is None:
        return
    table.columns.append("paper %")
    for row in table.rows:
        row.append(value if row[0] == "mean" else None)
    table.notes.append(f"paper: mean {value} with ResNet-101 features on the original images")


def _title(what: str, data: BenchData, k: int | None = None) -> str:
    return f"{what} - {data.describe()}" + (f", k={k}" if k is not None else "")


# ---------------------------------------------------------------------------------------------
# Protocols on single images
# ---------------------------------------------------------------------------------------------


def unimodal(data: BenchData, k: int = 2, *, class_dist: np.ndarray | None = None) -> Table:
    """Each class in turn is normal (its training embeddings), every test embedding is scored; ROCAUC
    per class and mean (paper Tables 1-4). ``class_dist`` from :func:`class_knn` avoids recomputing."""
    dist = class_knn(data, k) if class_dist is None else class_dist
    counts = data.train_counts()
    rows: list[list[Any]] = []
    for c, name in enumerate(data.classes):
        kk = min(k, int(counts[c]))
        auc = rocauc(data.y_test != c, dist[:, c, :kk].mean(axis=1)) if kk else float("nan")
        rows.append([name, int(counts[c]), auc])
    rows.append(["mean", int(counts.sum()), _mean([r[2] for r in rows])])
    table = Table("unimodal", _title("One class normal (unimodal)", data, k), ["normal class", "train images", "ROCAUC %"], rows,
                  plot=Plot("normal class", [("ROCAUC", "ROCAUC %", None)], kind="bar"))
    _paper_column(table, data, "unimodal")
    return table


def _multimodal_scores(dist: np.ndarray, held_out: int, k: int) -> np.ndarray:
    others = np.delete(dist, held_out, axis=1).reshape(len(dist), -1)
    return _mean_of_k_smallest(others, k)


def multimodal(data: BenchData, k: int = 2, *, class_dist: np.ndarray | None = None) -> Table:
    """All classes but one are normal (their training embeddings), the held-out class is the anomaly
    among all test images; ROCAUC per held-out class and mean (paper Table 5)."""
    dist = class_knn(data, k) if class_dist is None else class_dist
    counts = data.train_counts()
    rows: list[list[Any]] = []
    for c, name in enumerate(data.classes):
        kk = min(k, int(counts.sum() - counts[c]))
        rows.append([name, rocauc(data.y_test == c, _multimodal_scores(dist[:, :, :kk], c, kk))])
    rows.append(["mean", _mean([r[1] for r in rows])])
    table = Table("multimodal", _title("All classes but one normal (multimodal)", data, k), ["anomalous class", "ROCAUC %"], rows,
                  plot=Plot("anomalous class", [("ROCAUC", "ROCAUC %", None)], kind="bar"))
    _paper_column(table, data, "multimodal")
    return table


def neighbours(data: BenchData, ks: Sequence[int] = NEIGHBOURS, *, class_dist: np.ndarray | None = None) -> Table:
    """Mean unimodal and multimodal ROCAUC for each number of neighbours k (paper Fig. 2).

    k values above the smallest class's training set are left out (noted)."""
    smallest = int(data.train_counts().min())
    used = [k for k in ks if k <= smallest]
    dist = class_dist if class_dist is not None and class_dist.shape[2] >= max(used) else class_knn(data, max(used))
    rows = [
        [k, unimodal(data, k, class_dist=dist[:, :, :k]).row("mean")["ROCAUC %"],
         multimodal(data, k, class_dist=dist[:, :, :k]).row("mean")["ROCAUC %"]]
        for k in used
    ]
    table = Table("neighbours", _title("Number of neighbours k", data), ["k", "unimodal ROCAUC %", "multimodal ROCAUC %"], rows,
                  notes=[FIGURE_ONLY], plot=Plot("k", [("unimodal", "unimodal ROCAUC %", None), ("multimodal", "multimodal ROCAUC %", None)], logx=True))
    if len(used) < len(ks):
        table.notes.append(f"k > {smallest} (the smallest class's training images) left out")
    return table


def fewshot(data: BenchData, k: int = 2, shots: Sequence[int | None] = SHOTS, seeds: int = 3) -> Table:
    """N random training images per normal class (None = all), ``seeds`` draws each: mean and std over
    seeds of the mean-over-classes ROCAUC (paper Fig. 5 left/centre).

    With N < k the score averages k = N neighbours, so N = 1 still runs. N values not smaller
    than the smallest class are left out (they would be "all" for that class)."""
    counts = data.train_counts()
    smallest = int(counts.min())
    sizes = [n for n in shots if n is not None and n < smallest]
    aucs = {n: np.full((seeds, len(data.classes)), np.nan) for n in sizes}
    all_aucs = np.full(len(data.classes), np.nan)
    for c in range(len(data.classes)):
        train = data.train_of(c)
        draws = {(n, s): np.random.default_rng([s, c, n]).choice(len(train), n, replace=False) for n in sizes for s in range(seeds)}
        scores = {key: np.empty(len(data.x_test)) for key in draws}
        all_scores = np.empty(len(data.x_test))
        for rows in _test_chunks(len(data.x_test), len(train)):
            block = _distances(data.x_test[rows], train)
            for (n, s), idx in draws.items():
                scores[(n, s)][rows] = _mean_of_k_smallest(block[:, idx], min(k, n))
            all_scores[rows] = _mean_of_k_smallest(block, min(k, len(train)))
        is_anomaly = data.y_test != c
        for (n, s), sc in scores.items():
            aucs[n][s, c] = rocauc(is_anomaly, sc)
        all_aucs[c] = rocauc(is_anomaly, all_scores)
    rows: list[list[Any]] = []
    for n in sizes:
        per_seed = np.nanmean(aucs[n], axis=1)
        rows.append([n, min(k, n), _mean(per_seed), _std(per_seed), seeds])
    if None in shots:
        sizes_text = str(smallest) if smallest == counts.max() else f"{smallest}-{int(counts.max())}"
        rows.append([f"all ({sizes_text})", k, _mean(all_aucs), 0.0, 1])
    notes = [FIGURE_ONLY, f"k = min({k}, N): with fewer than k images the score averages all N distances"]
    if len(sizes) < len([n for n in shots if n is not None]):
        notes.append(f"N >= {smallest} (the smallest class's training images) left out")
    return Table("fewshot", _title("Few-shot: N training images per normal class", data, k),
                 ["N", "k used", "ROCAUC %", "std", "seeds"], rows, notes=notes,
                 plot=Plot("N", [("ROCAUC", "ROCAUC %", "std")], xlabel="training images per class", logx=True))


def _candidates(block: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The t smallest entries of each row of a distance block, ascending: (distances, column indices)."""
    t = min(t, block.shape[1])
    dist, idx = np.empty((len(block), t), np.float32), np.empty((len(block), t), np.int64)
    for r in range(0, len(block), 1024):  # argpartition returns a full-size index array: keep it small
        rows = block[r : r + 1024]
        part = np.argpartition(rows, t - 1, axis=1)[:, :t] if t < block.shape[1] else np.broadcast_to(np.arange(t), (len(rows), t))
        d = np.take_along_axis(rows, part, axis=1)
        order = np.argsort(d, axis=1, kind="stable")
        dist[r : r + 1024], idx[r : r + 1024] = np.take_along_axis(d, order, axis=1), np.take_along_axis(part, order, axis=1)
    return dist, idx


def _subset_score(block: np.ndarray, candidates: tuple[np.ndarray, np.ndarray], members: np.ndarray, k: int,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """Mean of the k smallest distances of each row (or of ``rows``) over the columns where ``members``
    is True. Exact: taken from the row's precomputed nearest candidates when k of them are members,
    else from the full row. Lets many training subsets be scored from one distance block."""
    cand_d, cand_i = candidates if rows is None else (candidates[0][rows], candidates[1][rows])
    inside = members[cand_i]
    taken = inside & (np.cumsum(inside, axis=1) <= k)
    scores = np.where(taken, cand_d, 0.0).sum(axis=1, dtype=np.float64) / k
    short = np.flatnonzero(taken.sum(axis=1) < k)
    if len(short):
        full_rows = short if rows is None else rows[short]
        scores[short] = _mean_of_k_smallest(block[full_rows][:, members], k)
    return scores


def _loo_clean(union: np.ndarray, candidates: tuple[np.ndarray, np.ndarray], kept: np.ndarray, k: int, fraction: float) -> np.ndarray:
    """The part of ``kept`` (indices into ``union``, a distance block with an inf diagonal) left by the
    paper's cleaning: the same rule as :func:`dn2.detector.clean_training_set`, on precomputed distances."""
    n = len(kept)
    kk = min(k, n - 1)
    n_keep = max(kk + 1, int(round(n * (1.0 - fraction))))
    if fraction == 0.0 or n_keep >= n:
        return kept
    members = np.zeros(len(union), dtype=bool)
    members[kept] = True
    loo = _subset_score(union, candidates, members, kk, rows=kept).astype(np.float32)
    return kept[np.sort(np.argsort(loo, kind="stable")[:n_keep])]


def impurity(data: BenchData, k: int = 2, fractions: Sequence[float] = IMPURITY_FRACTIONS, clean: float = 0.5, seeds: int = 3) -> Table:
    """A fraction of the normal class's training set replaced by random training images of other
    classes; ROCAUC without and with the paper's cleaning (drop the ``clean`` fraction with the
    largest leave-one-out score); mean and std over seeds (paper Fig. 5 right).

    Per class and seed one permutation and one pool of impurities are drawn, so the fractions are
    nested (the 5 % set extends the 2 % set): the curve shows the effect of impurity, not of draws.
    Memory: one (n_class + pool)^2 float32 block per class (~150 MB for CIFAR-10's 5,000)."""
    n_candidates = max(64, 8 * k)
    auc = {(f, cl): np.full((seeds, len(data.classes)), np.nan) for f in fractions for cl in (False, True)}
    for c in range(len(data.classes)):
        normal = data.train_of(c)
        others = np.flatnonzero(data.y_train != c)
        n = len(normal)
        pool_size = min(len(others), int(np.ceil(max(fractions) * n)))
        normal_normal = _distances(normal, normal)
        draws = []  # per seed: the pool (indices into x_train) and the training set (indices into normal + pool) per case
        for s in range(seeds):
            rng = np.random.default_rng([s, c])
            perm, pool = rng.permutation(n), rng.choice(others, pool_size, replace=False)
            union = np.empty((n + pool_size, n + pool_size), dtype=np.float32)
            union[:n, :n] = normal_normal
            union[:n, n:] = _distances(normal, data.x_train[pool])
            union[n:, :n] = union[:n, n:].T
            union[n:, n:] = _distances(data.x_train[pool], data.x_train[pool])
            np.fill_diagonal(union, np.inf)
            candidates = _candidates(union, n_candidates)
            cases = {}
            for f in fractions:
                m = min(int(round(f * n)), pool_size)
                train = np.concatenate([perm[m:], n + np.arange(m)])
                cases[(f, False)] = train
                cases[(f, True)] = _loo_clean(union, candidates, train, k, clean)
            draws.append((pool, cases))
            del union
        scores = {(s, case): np.empty(len(data.x_test)) for s in range(seeds) for case in auc}
        for rows in _test_chunks(len(data.x_test), n + pool_size):
            to_normal = _distances(data.x_test[rows], normal)
            for s, (pool, cases) in enumerate(draws):
                block = np.hstack([to_normal, _distances(data.x_test[rows], data.x_train[pool])])
                candidates = _candidates(block, n_candidates)
                for case, train in cases.items():
                    members = np.zeros(block.shape[1], dtype=bool)
                    members[train] = True
                    scores[(s, case)][rows] = _subset_score(block, candidates, members, min(k, len(train)))
        for (s, case), sc in scores.items():
            auc[case][s, c] = rocauc(data.y_test != c, sc)
    rows_out: list[list[Any]] = []
    for f in fractions:
        plain, cleaned = np.nanmean(auc[(f, False)], axis=1), np.nanmean(auc[(f, True)], axis=1)
        rows_out.append([100.0 * f, _mean(plain), _std(plain), _mean(cleaned), _std(cleaned)])
    return Table("impurity", _title("Impure training set", data, k),
                 ["impurity %", "ROCAUC %", "std", f"cleaned ({clean:.0%} dropped) ROCAUC %", "cleaned std"], rows_out,
                 notes=[FIGURE_ONLY, f"{seeds} seed(s); impurities are training images of other classes"],
                 plot=Plot("impurity %", [("no cleaning", "ROCAUC %", "std"), ("cleaning", f"cleaned ({clean:.0%} dropped) ROCAUC %", "cleaned std")]))


def backbones(datas: dict[str, BenchData], k: int = 2, *, class_dists: dict[str, np.ndarray] | None = None) -> Table:
    """Unimodal ROCAUC per class and mean for each backbone (paper Fig. 1): ``datas`` maps a backbone
    name to the same dataset embedded by it; ``class_dists`` optionally its :func:`class_knn`."""
    first = next(iter(datas.values()))
    columns = ["backbone", "dim", "mean ROCAUC %"] + list(first.classes)
    rows = []
    for name, data in datas.items():
        table = unimodal(data, k, class_dist=(class_dists or {}).get(name))
        rows.append([name, data.x_train.shape[1], table.row("mean")["ROCAUC %"]] + table.column("ROCAUC %")[:-1])
    notes = [FIGURE_ONLY + "; the paper's Fig. 1 compares ResNet-50/101/152"]
    if "unimodal" in paper_numbers(first):
        notes.append(f"paper: ResNet-101 mean {paper_numbers(first)['unimodal']}")
    return Table("backbones", f"Backbones (unimodal mean) - {first.name}, k={k}", columns, rows, notes=notes,
                 plot=Plot("backbone", [("mean ROCAUC", "mean ROCAUC %", None)], kind="bar"))


def kmeans_centres(data: BenchData, k: int = 2, centres: Sequence[int] = CENTRES, seed: int = 0, *,
                   class_dist: np.ndarray | None = None) -> Table:
    """Unimodal mean ROCAUC when each normal class is compressed to C k-means centres, and with the
    full training set (paper Table 6). With C < k the score averages k = C distances."""
    counts = data.train_counts()
    used = [n for n in centres if n <= counts.min()]
    rows: list[list[Any]] = []
    for n_centres in used:
        aucs = []
        for c in range(len(data.classes)):
            memory = kmeans(data.train_of(c), n_centres, seed=seed)
            aucs.append(rocauc(data.y_test != c, knn_score(knn(memory, data.x_test, min(k, n_centres))[0])))
        rows.append([str(n_centres), min(k, n_centres), _mean(aucs)])
    rows.append(["all (kNN)", k, unimodal(data, k, class_dist=class_dist).row("mean")["ROCAUC %"]])
    notes = ["paper Table 6: numbers not reproduced here"]
    if len(used) < len(centres):
        notes.append(f"C > {int(counts.min())} (the smallest class) left out")
    return Table("kmeans", _title("k-means compression: C centres per class", data, k), ["centres C", "k used", "ROCAUC %"], rows,
                 notes=notes, plot=Plot("centres C", [("ROCAUC", "ROCAUC %", None)], kind="bar"))


# ---------------------------------------------------------------------------------------------
# Group anomaly detection
# ---------------------------------------------------------------------------------------------


def _members_of(rng: np.random.Generator, labels: np.ndarray, set_classes: np.ndarray) -> np.ndarray:
    """For a matrix of class indices, a random image index of that class at each position."""
    idx = np.empty(set_classes.shape, dtype=np.int64)
    for c in np.unique(set_classes):
        where = set_classes == c
        idx[where] = rng.choice(np.flatnonzero(labels == c), int(where.sum()))
    return idx


def _one_of_each(rng: np.random.Generator, n_sets: int, m: int) -> np.ndarray:
    """Classes of normal sets: a random order of 0..m-1 per set."""
    return np.argsort(rng.random((n_sets, m)), axis=1)


def _random_mix(rng: np.random.Generator, n_sets: int, m: int) -> np.ndarray:
    """Classes of anomalous sets: m draws from 0..m-1, redrawn when they happen to be one of each."""
    classes = rng.integers(0, m, (n_sets, m))
    while True:
        normal = (np.sort(classes, axis=1) == np.arange(m)).all(axis=1)
        if not normal.any():
            return classes
        classes[normal] = rng.integers(0, m, (int(normal.sum()), m))


def group(data: BenchData, k: int = 2, sizes: Sequence[int] = GROUP_SIZES, n_train_sets: int = 1000,
          n_test_sets: int = 500, poolings: Sequence[str] = POOLINGS, seeds: int = 3) -> Table:
    """Group anomaly detection (paper Fig. 4): a normal set holds one image of each of classes 0..M-1
    (in random order), an anomalous set M images of random classes among them (redrawn if one of
    each). ``n_train_sets`` normal sets from the training embeddings; ``n_test_sets`` normal plus as
    many anomalous sets from the test embeddings; ROCAUC of DN2 on pooled sets per pooling."""
    used = [m for m in sizes if 2 <= m <= len(data.classes)]
    rows: list[list[Any]] = []
    for m in used:
        row: list[Any] = [m]
        for pooling in poolings:
            aucs = []
            for s in range(seeds):
                rng = np.random.default_rng([s, m])
                train_sets = data.x_train[_members_of(rng, data.y_train, _one_of_each(rng, n_train_sets, m))]
                test_classes = np.concatenate([_one_of_each(rng, n_test_sets, m), _random_mix(rng, n_test_sets, m)])
                test_sets = data.x_test[_members_of(rng, data.y_test, test_classes)]
                det = SetDetector(pooling=pooling, k=k).fit(list(train_sets))
                aucs.append(rocauc(np.repeat([False, True], n_test_sets), det.anomaly_score(list(test_sets))))
            row += [_mean(aucs), _std(aucs)]
        rows.append(row)
    columns = ["M"] + [c for p in poolings for c in (f"{p} ROCAUC %", f"{p} std")]
    notes = [FIGURE_ONLY, f"{n_train_sets} training sets, {n_test_sets} normal + {n_test_sets} anomalous test sets, {seeds} seed(s)"]
    if len(used) < len(sizes):
        notes.append(f"M limited by the dataset's {len(data.classes)} classes")
    return Table("group", _title("Group anomalies: sets of M images", data, k), columns, rows, notes=notes,
                 plot=Plot("M", [(p, f"{p} ROCAUC %", f"{p} std") for p in poolings], xlabel="set size M (classes)"))


def set_task(data: BenchData, k: int = 2, set_sizes: tuple[int, int] = (10, 50), n_train_sets: int = 1000,
             n_test_sets: int = 500, seeds: int = 3) -> Table:
    """Sets of 10-50 images of one class (normal) vs of mixed classes (anomalous), scored by the
    covariance trace of the members (no training) and by mean-pooled DN2 (trained on normal sets)."""
    n_classes = len(data.classes)
    trace_aucs, dn2_aucs = [], []
    for s in range(seeds):
        rng = np.random.default_rng([s, 1000])

        def draw(x: np.ndarray, labels: np.ndarray, n_sets: int, mixed: bool) -> list[np.ndarray]:
            lengths = rng.integers(set_sizes[0], set_sizes[1] + 1, n_sets)
            return [x[_members_of(rng, labels, rng.integers(0, n_classes, n) if mixed else np.full(n, rng.integers(n_classes)))]
                    for n in lengths]

        test_sets = draw(data.x_test, data.y_test, n_test_sets, False) + draw(data.x_test, data.y_test, n_test_sets, True)
        is_anomaly = np.repeat([False, True], n_test_sets)
        trace_aucs.append(rocauc(is_anomaly, np.array([covariance_trace(t) for t in test_sets])))
        det = SetDetector(pooling="mean", k=k).fit(draw(data.x_train, data.y_train, n_train_sets, False))
        dn2_aucs.append(rocauc(is_anomaly, det.anomaly_score(test_sets)))
    rows = [["covariance trace", _mean(trace_aucs), _std(trace_aucs)],
            [f"DN2, mean pooling (k={k})", _mean(dn2_aucs), _std(dn2_aucs)]]
    return Table("sets", _title(f"Set task: {set_sizes[0]}-{set_sizes[1]} images of one class vs mixed", data), ["method", "ROCAUC %", "std"],
                 rows, notes=[FIGURE_ONLY, f"{n_test_sets} normal + {n_test_sets} anomalous test sets, {seeds} seed(s)"],
                 plot=Plot("method", [("ROCAUC", "ROCAUC %", "std")], kind="bar"))


# ---------------------------------------------------------------------------------------------
# Running protocols: datasets -> embeddings -> tables
# ---------------------------------------------------------------------------------------------


def limit_dataset(ds: LabelledDataset, max_train_per_class: int | None = None, max_test: int | None = None, seed: int = 0) -> LabelledDataset:
    """A smaller copy for quick runs: at most N random training images per class, ``max_test`` random test images."""
    rng = np.random.default_rng(seed)
    train, test = ds.train, ds.test
    if max_train_per_class is not None:
        keep = [rng.permutation(np.flatnonzero(train.labels == c))[:max_train_per_class] for c in range(len(ds.classes))]
        train = subset(train, np.sort(np.concatenate(keep)))
    if max_test is not None and max_test < len(test):
        test = subset(test, np.sort(rng.permutation(len(test))[:max_test]))
    return LabelledDataset(ds.name, ds.classes, train, test)


def embed_dataset(ds: LabelledDataset, backbone: str = DEFAULT_BACKBONE, *, cache_dir: str | None = None, use_cache: bool = True,
                  echo: Callable[[str], None] = print, **embedder_options: Any) -> BenchData:
    """Embed both splits with one backbone, through the embedding cache; prints the wall time of each.

    Example:
        >>> from dn2.datasets import load_dataset
        >>> data = embed_dataset(load_dataset("cifar10.zip"), "efficientnet_lite0")  # doctest: +SKIP
    """
    from .cache import cached_embed
    from .features import Embedder

    embedder = Embedder(backbone=backbone, **embedder_options)
    vectors, labels = {}, {}
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        start = time.perf_counter()
        emb = cached_embed(embedder, split.source, cache_dir, use_cache=use_cache)
        vectors[split_name], labels[split_name] = emb.vectors, _labels_of(split, emb.names)
        echo(f"embedded {split_name}: {len(emb.vectors):,} images with {backbone} in {time.perf_counter() - start:.1f} s")
    blocks = tuple(embedder.part_dims()) if len(backbone_names(backbone)) > 1 else None  # an ensemble's parts
    return BenchData(ds.name, ds.classes, vectors["train"], labels["train"], vectors["test"], labels["test"], backbone=backbone,
                     blocks=blocks)


STATELESS_NORMALIZATIONS = ("none", "l2", "sqrt_l2")


def normalized(data: BenchData, normalize: str) -> BenchData:
    """The same embeddings through a row-wise transform of :mod:`dn2.normalize` (``l2``, ``sqrt_l2``).

    Only row-wise transforms: they need no fitting, so every protocol (whose normal sets change
    from row to row) sees exactly what ``KNNDetector(normalize=...)`` would.
    """
    if normalize not in STATELESS_NORMALIZATIONS:
        raise ValueError(f"dn2 bench --normalize takes one of {STATELESS_NORMALIZATIONS} (row-wise); "
                         f"fitted transforms such as {normalize!r} are compared in benchmarks/ablation.py")
    t = make_transform(normalize, data.blocks)  # an ensemble: each backbone's part on its own
    return BenchData(data.name, data.classes, t.transform(data.x_train), data.y_train, t.transform(data.x_test), data.y_test,
                     backbone=f"{data.backbone}, {normalize}" if data.backbone else normalize)


def _labels_of(split: Split, names: list[str]) -> np.ndarray:
    """Labels of the embedded images (all of them, or those left after skipping bad ones)."""
    if len(names) == len(split):
        return split.labels
    embedded = set(names)
    return split.labels[[i for i in range(len(split)) if split.source.name(i) in embedded]]


def run_protocols(protocol: str, datas: dict[str, BenchData], k: int = 2, seeds: int = 3,
                  echo: Callable[[str], None] = print) -> list[Table]:
    """Run one protocol (or ``all``) on the first dataset of ``datas`` (``backbones``: on each);
    prints each protocol's wall time. One :func:`class_knn` of the first dataset is shared by the
    protocols that score with the full training sets."""
    names = [p for p in PROTOCOLS if p != "all"] if protocol == "all" else [protocol]
    data = next(iter(datas.values()))
    shared: dict[int, np.ndarray] = {}

    def class_dist() -> np.ndarray:
        if not shared:
            k_max = min(max([k] + (list(NEIGHBOURS) if "neighbours" in names else [])), int(data.train_counts().max()))
            shared[0] = class_knn(data, k_max)
        return shared[0]

    tables: list[Table] = []
    for name in names:
        start = time.perf_counter()
        if name == "unimodal":
            new = [unimodal(data, k, class_dist=class_dist()[:, :, :k])]
        elif name == "multimodal":
            new = [multimodal(data, k, class_dist=class_dist()[:, :, :k])]
        elif name == "neighbours":
            new = [neighbours(data, class_dist=class_dist())]
        elif name == "fewshot":
            new = [fewshot(data, k, seeds=seeds)]
        elif name == "impurity":
            new = [impurity(data, k, seeds=seeds)]
        elif name == "backbones":
            new = [backbones(datas, k, class_dists={next(iter(datas)): class_dist()[:, :, :k]})]
        elif name == "kmeans":
            new = [kmeans_centres(data, k, class_dist=class_dist()[:, :, :k])]
        elif name == "group":
            new = [group(data, k, seeds=seeds), set_task(data, k, seeds=seeds)]
        else:
            raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
        echo(f"{name}: {time.perf_counter() - start:.1f} s")
        tables += new
    return tables


def _backbone_list(args: argparse.Namespace) -> list[str]:
    if args.backbone:
        return [b.strip() for b in args.backbone.split(",") if b.strip()]
    return list(LITE_BACKBONES) if args.protocol in ("backbones", "all") else [DEFAULT_BACKBONE]


def _command_line(args: argparse.Namespace) -> str:
    """The options that shape the results, as a command to paste (for the report)."""
    parts = ["dn2 bench", args.protocol, "--data", str(args.data)]
    for option in ("backbone", "normalize", "k", "seeds", "max_train_per_class", "max_test", "format", "precision", "runtime"):
        value, default = getattr(args, option), {"k": 2, "seeds": 3, "format": "auto", "precision": "auto", "runtime": "auto",
                                                 "normalize": "none"}.get(option)
        if value is not None and value != default:
            parts += [f"--{option.replace('_', '-')}", str(value)]
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    """``dn2 bench``: load, (limit), embed once per backbone, run, print and write tables."""
    total = time.perf_counter()
    if args.k < 1 or args.seeds < 1:
        raise ValueError("--k and --seeds must be at least 1")
    ds = limit_dataset(load_dataset(args.data, format=args.format), args.max_train_per_class, args.max_test)
    print(describe(ds))
    names = _backbone_list(args)
    if args.protocol not in ("backbones", "all"):
        names = names[:1]  # the other protocols use the first backbone listed
    options = dict(batch_size=args.batch_size, num_workers=args.workers,
                   precision=method_precision(args.precision, args.normalize),
                   runtime=args.runtime, progress=not args.quiet, skip_bad=args.skip_bad)
    datas = {b: embed_dataset(ds, b, cache_dir=args.cache_dir, use_cache=not args.no_cache, **options) for b in names}
    if args.normalize != "none":
        datas = {b: normalized(d, args.normalize) for b, d in datas.items()}
    tables = run_protocols(args.protocol, datas, k=args.k, seeds=args.seeds)
    for table in tables:
        print()
        print(format_table(table))
        write_table(table, args.out)
    print(f"\nwrote {len(tables)} table(s) (CSV, markdown, PNG) to {args.out}")
    if args.report:
        command = _command_line(args)
        preamble = [describe(ds), f"backbones: {', '.join(names)}; k={args.k}; seeds={args.seeds}", f"command: {command}"]
        index = write_html(tables, args.report, title=f"dn2 bench {args.protocol}: {ds.name}", preamble=preamble)
        print(f"wrote report {index}")
    print(f"total wall time {time.perf_counter() - total:.1f} s")
    return 0


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dn2 bench`` on the ``dn2`` command's subparsers."""
    p = sub.add_parser(
        "bench", help="reproduce the paper's protocols on a labelled dataset",
        description="Run the DN2 paper's protocols on a labelled dataset (class folders, zip, CIFAR, idx, CSV); "
                    "writes <protocol>.csv/.md/.png to --out. Example: dn2 bench unimodal --data cifar10.zip",
    )
    p.add_argument("protocol", choices=PROTOCOLS, help="which protocol (all: every one)")
    p.add_argument("--data", required=True, help="dataset: class folders (train/ test/), zip, CIFAR/MNIST files, CSV manifest")
    p.add_argument("--format", choices=FORMATS, default="auto", help="dataset format (default: detect)")
    p.add_argument("--backbone", default=None,
                   help=f"backbone(s), comma-separated (default {DEFAULT_BACKBONE}; for backbones/all: {','.join(LITE_BACKBONES)}); "
                        "protocols other than backbones use the first")
    p.add_argument("--k", type=int, default=2, help="neighbours averaged in the score (default 2)")
    p.add_argument("--normalize", choices=STATELESS_NORMALIZATIONS, default="none",
                   help="row-wise embedding transform before the kNN (default none: the paper's method)")
    p.add_argument("--seeds", type=int, default=3, help="random draws for fewshot, impurity, group (default 3)")
    p.add_argument("--out", default="bench-out", help="directory for <protocol>.csv/.md/.png, overwritten (default bench-out/)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write a self-contained HTML report (index.html) with markdown and CSV here")
    p.add_argument("--no-cache", action="store_true", help="always embed, never read or write the embedding cache")
    p.add_argument("--cache-dir", default=None, help="embedding cache directory (default $DN2_CACHE or ~/.cache/dn2/embeddings)")
    p.add_argument("--max-train-per-class", type=int, default=None, metavar="N", help="use at most N random training images per class")
    p.add_argument("--max-test", type=int, default=None, metavar="N", help="use at most N random test images")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="inference precision (default: auto)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help="inference runtime (default: auto)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the runtime's fastest)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: auto)")
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    return p
