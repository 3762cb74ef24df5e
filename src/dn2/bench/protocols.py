"""The DN2 paper's evaluation protocols as a registry of pure functions over embeddings.

Every protocol takes a :class:`~dn2.bench.data.BenchData` (train/test embeddings and their class
labels) and returns :class:`~dn2.bench.report.Table` s of ROCAUC % values, so it runs in seconds on
cached embeddings and is tested without a network. The protocols score with the product's own
pieces (:func:`dn2.search.knn`, :func:`dn2.search.knn_score`, :func:`dn2.detector.clean_training_set`,
:class:`dn2.group.SetDetector`), so a benchmark cannot drift from what users run.

Protocols (Bergman, Cohen & Hoshen 2020), registered in :data:`PROTOCOLS`: unimodal (Tables 1-4),
multimodal (Table 5), fewshot and impurity (Fig. 5), neighbours (Fig. 2), backbones (Fig. 1),
kmeans (Table 6), group (Fig. 4 and the covariance-trace set task).

Example:
    >>> import numpy as np
    >>> from dn2.bench.data import BenchData
    >>> from dn2.bench.protocols import unimodal
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(0, 10, (3, 8))
    >>> y_train, y_test = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    >>> data = BenchData("toy", ["a", "b", "c"], centres[y_train] + rng.normal(size=(60, 8)), y_train,
    ...                  centres[y_test] + rng.normal(size=(30, 8)), y_test)
    >>> unimodal(data, k=2).row("mean")["ROCAUC %"]
    100.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import working_memory_bytes
from ..detector import clean_training_set
from ..group import SetDetector, covariance_trace
from ..maps.metrics import auroc
from ..search import kmeans, knn, knn_score, pairwise_distances
from .data import BenchData, paper_numbers
from .report import Plot, Table

__all__ = [
    "PROTOCOLS", "Protocol", "rocauc", "class_knn", "unimodal", "multimodal", "fewshot", "impurity", "neighbours",
    "backbones", "kmeans_centres", "group", "set_task", "run_protocols",
]

SHOTS = (1, 2, 5, 10, 20, 50, 100, 500, None)  # None: all training images of the class
IMPURITY_FRACTIONS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20)
NEIGHBOURS = (1, 2, 3, 5, 10, 20, 50)
CENTRES = (1, 3, 5, 10)
GROUP_SIZES = tuple(range(2, 11))
POOLINGS = ("concat", "mean", "max")
FIGURE_ONLY = "paper: figure only (no numbers to compare with)"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def rocauc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """ROCAUC in % of anomaly scores (higher = more anomalous); NaN if only one kind is present."""
    return 100.0 * auroc(is_anomaly, scores)


def _mean(values: Sequence[float]) -> float:
    return float(np.nanmean(values)) if len(values) else float("nan")


def _std(values: Sequence[float]) -> float:
    return float(np.nanstd(values)) if len(values) > 1 else 0.0


def _mean_of_k_smallest(dist: np.ndarray, k: int) -> np.ndarray:
    """The DN2 score (:func:`dn2.search.knn_score`) from a full distance block: each row's k smallest values."""
    if k < dist.shape[1]:
        dist = np.partition(dist, k - 1, axis=1)[:, :k]
    return knn_score(dist)


def _test_chunks(n_test: int, n_cols: int) -> Iterator[slice]:
    """Row slices of the test set so one (rows x n_cols) float32 block stays within half the working memory
    (``dn2.config``; the other half holds the protocol's own temporaries)."""
    step = max(1, working_memory_bytes() // 2 // max(1, 4 * n_cols))
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
            block = pairwise_distances(data.x_test[rows], train)
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
    kk = min(k, len(kept) - 1)
    if fraction == 0.0:
        return kept
    members = np.zeros(len(union), dtype=bool)
    members[kept] = True
    loo = _subset_score(union, candidates, members, kk, rows=kept).astype(np.float32)
    return kept[clean_training_set(loo, fraction, kk)]


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
        normal_normal = pairwise_distances(normal, normal)
        draws = []  # per seed: the pool (indices into x_train) and the training set (indices into normal + pool) per case
        for s in range(seeds):
            rng = np.random.default_rng([s, c])
            perm, pool = rng.permutation(n), rng.choice(others, pool_size, replace=False)
            union = np.empty((n + pool_size, n + pool_size), dtype=np.float32)
            union[:n, :n] = normal_normal
            union[:n, n:] = pairwise_distances(normal, data.x_train[pool])
            union[n:, :n] = union[:n, n:].T
            union[n:, n:] = pairwise_distances(data.x_train[pool], data.x_train[pool])
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
            to_normal = pairwise_distances(data.x_test[rows], normal)
            for s, (pool, cases) in enumerate(draws):
                block = np.hstack([to_normal, pairwise_distances(data.x_test[rows], data.x_train[pool])])
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




@dataclass
class Context:
    """What the protocols of one run share: the embeddings (one dataset per backbone), k, seeds, and one
    :func:`class_knn` of the first dataset, computed on first use for the largest k any protocol needs."""

    datas: dict[str, BenchData]
    k: int = 2
    seeds: int = 3
    k_max: int = 2
    _class_dist: np.ndarray | None = field(default=None, repr=False)

    @property
    def data(self) -> BenchData:
        return next(iter(self.datas.values()))

    def class_dist(self, k: int | None = None) -> np.ndarray:
        if self._class_dist is None:
            self._class_dist = class_knn(self.data, min(self.k_max, int(self.data.train_counts().max())))
        return self._class_dist if k is None else self._class_dist[:, :, :k]


@dataclass(frozen=True)
class Protocol:
    """A registered protocol: its name, what it reproduces, the largest k it uses, and how it runs."""

    name: str
    reproduces: str
    run: Callable[[Context], list[Table]]
    k_max: Callable[[int], int] = lambda k: k


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol("unimodal", "Tables 1-4", lambda c: [unimodal(c.data, c.k, class_dist=c.class_dist(c.k))]),
    Protocol("multimodal", "Table 5", lambda c: [multimodal(c.data, c.k, class_dist=c.class_dist(c.k))]),
    Protocol("fewshot", "Fig. 5 left/centre", lambda c: [fewshot(c.data, c.k, seeds=c.seeds)]),
    Protocol("impurity", "Fig. 5 right", lambda c: [impurity(c.data, c.k, seeds=c.seeds)]),
    Protocol("neighbours", "Fig. 2", lambda c: [neighbours(c.data, class_dist=c.class_dist())],
             k_max=lambda k: max(k, *NEIGHBOURS)),
    Protocol("backbones", "Fig. 1",
             lambda c: [backbones(c.datas, c.k, class_dists={next(iter(c.datas)): c.class_dist(c.k)})]),
    Protocol("kmeans", "Table 6", lambda c: [kmeans_centres(c.data, c.k, class_dist=c.class_dist(c.k))]),
    Protocol("group", "Fig. 4 and the set task", lambda c: [group(c.data, c.k, seeds=c.seeds),
                                                            set_task(c.data, c.k, seeds=c.seeds)]),
]}


def run_protocols(protocol: str, datas: dict[str, BenchData], k: int = 2, seeds: int = 3,
                  echo: Callable[[str], None] = print) -> list[Table]:
    """Run one registered protocol (or ``all``) on the first dataset of ``datas`` (``backbones``: on each);
    reports each protocol's wall time through ``echo``."""
    if protocol != "all" and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)} or all")
    chosen = list(PROTOCOLS.values()) if protocol == "all" else [PROTOCOLS[protocol]]
    context = Context(datas, k=k, seeds=seeds, k_max=max(p.k_max(k) for p in chosen))
    tables: list[Table] = []
    for p in chosen:
        start = time.perf_counter()
        tables += p.run(context)
        echo(f"{p.name}: {time.perf_counter() - start:.1f} s")
    return tables
