"""Does the fast path cost accuracy? CIFAR-10 one-class ROCAUC of embeddings from each runtime/precision.

The reference is dn2's PyTorch fp32 embedding of the full CIFAR-10 copy (from the embedding cache,
made by ``dn2 bench``); the other paths embed a random subset afresh (no cache) and the reference
is restricted to the same images. Reports the embeddings' largest relative difference and the
unimodal mean ROCAUC (raw features, the paper's method, and sqrt_l2) of each path.

Usage:
    python benchmarks/fastpath_accuracy.py --data ../shared/datasets/cifar10-jpeg.zip \
        --paths onnx:fp32,torch:bf16 --max-train-per-class 300 --max-test 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import unimodal_aucs  # noqa: E402
from machine import header  # noqa: E402

from dn2.bench import limit_dataset  # noqa: E402
from dn2.cache import cached_embed  # noqa: E402
from dn2.datasets import load_dataset  # noqa: E402
from dn2.features import Embedder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--paths", default="onnx:fp32,torch:bf16", help="runtime:precision pairs")
    ap.add_argument("--max-train-per-class", type=int, default=300)
    ap.add_argument("--max-test", type=int, default=2000)
    args = ap.parse_args()
    print(header("fast path accuracy"))
    full = load_dataset(args.data)
    ds = limit_dataset(full, args.max_train_per_class, args.max_test)
    itr, ite = ds.train.source.indices, ds.test.source.indices
    ref = Embedder(backbone=args.backbone, runtime="torch", precision="fp32", num_workers=1)
    xtr_ref = cached_embed(ref, full.train.source).vectors[itr]
    xte_ref = cached_embed(ref, full.test.source).vectors[ite]
    ytr, yte = ds.train.labels, ds.test.labels
    print(f"{args.backbone}: {len(ytr)} train, {len(yte)} test images\n")
    print("| path | max rel. diff vs torch fp32 | ROCAUC % raw | ROCAUC % sqrt_l2 | img/s |")
    print("|---|---|---|---|---|")
    rows = [("torch:fp32 (reference)", xtr_ref, xte_ref, 0.0, float("nan"))]
    for path in [p for p in args.paths.split(",") if p]:
        runtime, precision = path.split(":")
        emb = Embedder(backbone=args.backbone, runtime=runtime, precision=precision, num_workers=1)
        start = time.perf_counter()
        xtr, xte = emb.transform(ds.train.source), emb.transform(ds.test.source)
        rate = (len(xtr) + len(xte)) / (time.perf_counter() - start)
        diff = max(np.abs(xtr - xtr_ref).max() / np.abs(xtr_ref).max(), np.abs(xte - xte_ref).max() / np.abs(xte_ref).max())
        rows.append((path, xtr, xte, float(diff), rate))
    for name, xtr, xte, diff, rate in rows:
        raw = np.mean(unimodal_aucs(xtr, ytr, xte, yte))
        sq = np.mean(unimodal_aucs(xtr, ytr, xte, yte, normalize="sqrt_l2"))
        print(f"| {name} | {diff:.1e} | {raw:.3f} | {sq:.3f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
