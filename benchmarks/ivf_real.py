"""Approximate search on real embeddings: dn2's IVF vs exact kNN on CIFAR-10 features.

The synthetic Gaussian mixture of benchmarks/search.py may flatter an inverted file. Here the
training set is all 50,000 CIFAR-10 training images embedded by a real ImageNet backbone (PyTorch
fp32, through dn2's embedding cache), the queries the 10,000 test images, k = 2. For each index:
recall@2 of the exact neighbours, the DN2 score's relative difference from the exact score (median
and maximum), and fit / search seconds. Raw features (the paper) and sqrt_l2 (the ``best`` preset).

Usage (a few minutes when the embeddings are cached, about 5 more to embed them):
    python benchmarks/ivf_real.py --data ../shared/datasets/cifar10-jpeg.zip
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embed_splits, header  # noqa: E402

from dn2.datasets import load_dataset  # noqa: E402
from dn2.normalize import make_transform  # noqa: E402
from dn2.search import knn_score, make_index, recall_at_k  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--indexes", default="ivf:nprobe=4,ivf:nprobe=8,ivf,ivf:nprobe=32,ivf_faiss",
                    help="comma-separated kind[:param=value+param=value]")
    args = ap.parse_args()
    print(header("Approximate search on real embeddings"))
    ds = load_dataset(args.data)
    xtr_raw, xte_raw, _ = embed_splits(ds, args.backbone, runtime="torch", precision="fp32", num_workers=2)
    print(f"- {args.backbone} PyTorch fp32 embeddings: {xtr_raw.shape[0]} train x {xtr_raw.shape[1]}, "
          f"{xte_raw.shape[0]} test queries, k = {args.k}\n")
    print("| features | index | fit s | search s | speed-up vs exact | recall@k | median rel. score diff | max rel. score diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for normalize in ("none", "sqrt_l2"):
        t = make_transform(normalize).fit(xtr_raw)
        xtr, xte = t.transform(xtr_raw), t.transform(xte_raw)
        start = time.perf_counter()
        exact = make_index("exact").fit(xtr)
        ref_d, ref_i = exact.search(xte, args.k)
        exact_s = time.perf_counter() - start
        ref = knn_score(ref_d)
        print(f"| {normalize} | exact (default) | 0.00 | {exact_s:.2f} | 1.0x | 1.0000 | 0 | 0 |", flush=True)
        for spec in filter(None, args.indexes.split(",")):
            kind, _, rest = spec.partition(":")
            params = {key: int(value) for key, _, value in (p.partition("=") for p in filter(None, rest.split("+")))}
            start = time.perf_counter()
            index = make_index(kind, **params).fit(xtr)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            dist, idx = index.search(xte, args.k)
            search_s = time.perf_counter() - start
            rel = np.abs(knn_score(dist) - ref) / ref
            print(f"| {normalize} | {spec} | {fit_s:.2f} | {search_s:.2f} | {exact_s / search_s:.1f}x | "
                  f"{recall_at_k(idx, ref_i):.4f} | {np.median(rel):.1e} | {rel.max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
