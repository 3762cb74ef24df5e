"""Does the fast path cost accuracy? CIFAR-10 one-class ROCAUC of embeddings from each runtime/precision.

Every path embeds the same images (all of CIFAR-10 by default, or a random subset) through the
embedding cache (a bf16 entry is keyed by its runtime too, so paths never share one; a second fp32
path would share the reference's entry, so it is embedded afresh without the cache). The
reference is PyTorch fp32 unless ``--reference`` says otherwise. Reports, per path, the largest
per-image relative difference from the reference (||e - e_ref|| / ||e_ref||), the unimodal mean
ROCAUC (raw features, the paper's method; and sqrt_l2, the ``best`` preset's transform), the
difference from the reference in points, and the extraction rate when the path was not cached.

Usage:
    python benchmarks/fastpath_accuracy.py --data ../shared/datasets/cifar10-jpeg.zip \
        --paths openvino:fp32,openvino:bf16,torch:bf16
    python benchmarks/fastpath_accuracy.py --data ... --max-train-per-class 300 --max-test 2000   # subset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embed_splits, header, unimodal_aucs  # noqa: E402

from dn2 import runtime  # noqa: E402
from dn2.bench import limit_dataset  # noqa: E402
from dn2.datasets import load_dataset  # noqa: E402


def embed(backbone: str, path: str, ds, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Train and test embeddings of ``ds`` by one runtime:precision path, and img/s (nan when cached)."""
    runtime_name, precision = path.split(":")
    xtr, xte, seconds = embed_splits(ds, backbone, use_cache=use_cache, runtime=runtime_name, precision=precision,
                                     num_workers=1)
    rate = (len(xtr) + len(xte)) / seconds if seconds > 5 else float("nan")  # a cache hit takes < 5 s
    return xtr, xte, rate


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row relative difference ||a_i - b_i|| / ||b_i||."""
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--reference", default="torch:fp32", help="runtime:precision of the reference")
    ap.add_argument("--paths", default="openvino:fp32,openvino:bf16,torch:bf16", help="runtime:precision pairs")
    ap.add_argument("--openvino-fp32-parts", default=None,
                    help="override dn2.runtime.BF16_FP32_PARTS for OpenVINO bf16 ('' = all bf16; e.g. 'early,head')")
    ap.add_argument("--max-train-per-class", type=int, default=0, help="0 = all training images")
    ap.add_argument("--max-test", type=int, default=0, help="0 = all test images")
    args = ap.parse_args()
    if args.openvino_fp32_parts is not None:
        runtime.BF16_FP32_PARTS = tuple(p for p in args.openvino_fp32_parts.split(",") if p)
    print(header("fast path accuracy"))
    ds = load_dataset(args.data)
    if args.max_train_per_class or args.max_test:
        ds = limit_dataset(ds, args.max_train_per_class or None, args.max_test or None)
    ytr, yte = ds.train.labels, ds.test.labels
    print(f"{args.backbone}: {len(ytr)} train, {len(yte)} test images; reference {args.reference}; "
          f"OpenVINO bf16 keeps {', '.join(runtime.BF16_FP32_PARTS) or 'nothing'} in fp32\n")
    xtr_ref, xte_ref, ref_rate = embed(args.backbone, args.reference, ds)
    ref_raw = float(np.mean(unimodal_aucs(xtr_ref, ytr, xte_ref, yte)))
    ref_sq = float(np.mean(unimodal_aucs(xtr_ref, ytr, xte_ref, yte, normalize="sqrt_l2")))
    print("| path | max rel. diff vs reference | ROCAUC % raw | diff (points) | ROCAUC % sqrt_l2 | diff (points) | img/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.reference} (reference) | 0 | {ref_raw:.3f} | | {ref_sq:.3f} | | {ref_rate:.1f} |", flush=True)
    for path in [p for p in args.paths.split(",") if p and p != args.reference]:
        # fp32 runtimes share cache entries (they agree to ~1e-6): a second fp32 path is embedded afresh.
        fresh = path.endswith(":fp32") and args.reference.endswith(":fp32")
        xtr, xte, rate = embed(args.backbone, path, ds, use_cache=not fresh)
        diff = max(rel_diff(xtr, xtr_ref), rel_diff(xte, xte_ref))
        raw = float(np.mean(unimodal_aucs(xtr, ytr, xte, yte)))
        sq = float(np.mean(unimodal_aucs(xtr, ytr, xte, yte, normalize="sqrt_l2")))
        print(f"| {path} | {diff:.1e} | {raw:.3f} | {raw - ref_raw:+.3f} | {sq:.3f} | {sq - ref_sq:+.3f} | {rate:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
