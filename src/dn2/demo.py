"""``dn2 demo``: one-class DN2 on scikit-learn's bundled 8x8 digits, which runs fully offline.

Each digit in turn is the normal class: DN2 is fitted on that digit's training images and every
test image is scored; the ROCAUC says how well the other digits are told apart as anomalies.

Example:
    >>> from dn2.demo import run_demo
    >>> aucs = run_demo(per_class=20, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from .backbones import DEFAULT_BACKBONE
from .detector import KNNDetector
from .features import Embedder
from .settings import PRESETS


def digits_images(per_class: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The digits as (N, 8, 8) uint8 images and their labels; optionally ``per_class`` of each."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    return images, labels


def one_class_aucs(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int = 2) -> dict[int, float]:
    """ROCAUC per normal class: fit on that class's training embeddings, score all test embeddings."""
    aucs = {}
    for c in np.unique(y_train):
        det = KNNDetector(k=k).fit(train[y_train == c])
        aucs[int(c)] = float(roc_auc_score(y_test != c, det.anomaly_score(test)))
    return aucs


def run_demo(
    per_class: int | None = None,
    backbone: str = DEFAULT_BACKBONE,
    k: int = 2,
    precision: str = "auto",
    progress: bool = True,
) -> dict[int, float]:
    """Embed the digits once, then run the one-class protocol; returns ROCAUC per digit."""
    images, labels = digits_images(per_class)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=0)
    precision = PRESETS["paper"].overlay(precision=precision).extraction_precision()  # raw features: fp32 unless asked
    # fit_transform: in int8 the network is quantised on (a sample of) the digits themselves, once for all classes
    vectors = Embedder(backbone=backbone, precision=precision, progress=progress).fit_transform(images)
    return one_class_aucs(vectors[idx_train], labels[idx_train], vectors[idx_test], labels[idx_test], k=k)


def main(per_class: int | None, backbone: str, k: int, precision: str, progress: bool) -> int:
    """Print the per-class table and the mean, as ``dn2 demo`` does."""
    start = time.perf_counter()
    aucs = run_demo(per_class, backbone, k, precision, progress)
    print(f"DN2 one-class ROCAUC on scikit-learn digits (backbone {backbone}, k={k})")
    print("normal digit | ROCAUC %")
    for c, auc in aucs.items():
        print(f"{c:>12} | {100 * auc:6.1f}")
    print(f"{'mean':>12} | {100 * np.mean(list(aucs.values())):6.1f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0
