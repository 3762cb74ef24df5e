"""Does patch-level evidence help whole-image detection of *semantic* anomalies? CIFAR-10 one class.

Each class is normal in turn: ``dn2.DN2(maps="spade", image_score="combined")`` (the ``best`` preset
otherwise) is fitted on the first ``--train`` training images of that class (sorted by name) and
scores a shared test set (the first ``--test`` test images of every class); one pass gives each
test image's three image scores (``model.localize``): the image-level DN2 score (the default rule),
the map's largest patch distance ("map") and their combination ("combined", the sum of z-scores
against the training leave-one-out scores). Prints the ROCAUC % of each per class and the mean,
the comparison behind the default ``image_score="dn2"`` (BENCHMARKS.md, "Anomaly maps").

    python benchmarks/maps_cifar.py                          # 500 train / class, 100 test / class
    python benchmarks/maps_cifar.py --train 100 --classes 2  # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header  # noqa: E402

import dn2  # noqa: E402
from dn2.bench import rocauc  # noqa: E402
from dn2.datasets import load_dataset, subset  # noqa: E402

CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.zip"
RULES = ("dn2", "map", "combined")


def first_per_class(labels: np.ndarray, names: list[str], n: int, classes: range) -> np.ndarray:
    """Indices of the first ``n`` images (by name) of each class in ``classes``."""
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        picked += sorted(members, key=lambda i: names[i])[:n]
    return np.asarray(picked, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CIFAR_ZIP))
    p.add_argument("--train", type=int, default=500, help="training images of the normal class (default 500)")
    p.add_argument("--test", type=int, default=100, help="test images per class (default 100)")
    p.add_argument("--classes", type=int, default=10, help="the first N classes are each normal in turn (default 10)")
    p.add_argument("--maps", default="spade", help="spade (default) or patchcore")
    args = p.parse_args(argv)

    print(header("Anomaly maps on CIFAR-10: do patches help whole-image detection of semantic anomalies?"))
    ds = load_dataset(args.data)
    classes = range(min(args.classes, len(ds.classes)))
    train_names = ds.train.source.names()
    test = subset(ds.test, first_per_class(ds.test.labels, ds.test.source.names(), args.test, range(len(ds.classes))))
    print(f"{ds.name}: {args.train} training images per normal class, {len(test)} test images "
          f"({args.test} per class); maps={args.maps}, image scores {', '.join(RULES)}")
    rows = []
    for c in classes:
        start = time.perf_counter()
        train = subset(ds.train, first_per_class(ds.train.labels, train_names, args.train, [c]))
        model = dn2.DN2(maps=args.maps, image_score="combined", progress=False).fit(train.source)
        results = sorted(model.localize(test.source), key=lambda r: r.index)
        if len(results) != len(test):
            raise RuntimeError(f"{len(test) - len(results)} test images were not scored")
        scores = {"dn2": [r.dn2_score for r in results], "map": [r.map_score for r in results],
                  "combined": [r.image_score for r in results]}
        is_anomaly = test.labels != c
        aucs = [rocauc(is_anomaly, np.asarray(scores[rule])) for rule in RULES]
        rows.append((ds.classes[c], *aucs))
        print(f"  {ds.classes[c]:<12} " + "  ".join(f"{rule} {auc:5.1f}" for rule, auc in zip(RULES, aucs))
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print("| normal class | image-level DN2 (default) | map (largest patch distance) | combined (z-sum) |")
    print("| --- | --- | --- | --- |")
    for name, *aucs in rows:
        print(f"| {name} | " + " | ".join(f"{a:.1f}" for a in aucs) + " |")
    means = np.mean([r[1:] for r in rows], axis=0)
    print("| **mean** | " + " | ".join(f"**{m:.1f}**" for m in means) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
