"""Issue 5 ablation: training-free embedding and score options, CIFAR-10 one-class (unimodal) ROCAUC.

Each option is scored exactly as ``dn2 bench unimodal`` does (each class in turn is normal, its
training embeddings fitted, all test images scored, ROCAUC per class and mean), but on embeddings
read from the embedding cache, so a sweep costs seconds per row once a backbone is embedded.
Fitted transforms (centred_l2, standardise, whiten) are fitted on the normal class's training
embeddings only. Ensembles concatenate the per-backbone normalised embeddings (each row of unit
norm, so every backbone weighs the same).

Usage:
    python benchmarks/ablation.py --data ../shared/datasets/cifar10-jpeg.zip \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 [--out ablation.md]
    python benchmarks/ablation.py --data ... --max-train-per-class 500 --max-test 2000 \
        --extract flip,stages      # options that need new embeddings, on a subset
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from common import embed_splits, unimodal_aucs
from dn2.bench import limit_dataset
from dn2.datasets import load_dataset
from dn2.normalize import NORMALIZATIONS, make_transform


def row(name: str, aucs: list[float], extra: str = "") -> str:
    cells = " | ".join(f"{a:.1f}" for a in aucs)
    return f"| {name} | {np.mean(aucs):.2f} | {cells} | {extra} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2")
    ap.add_argument("--normalizations", default=",".join(NORMALIZATIONS))
    ap.add_argument("--ks", default="1,2,5,10")
    ap.add_argument("--extract", default="", help="comma list of flip,stages: options needing new embeddings")
    ap.add_argument("--max-train-per-class", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    full = load_dataset(args.data)
    ds = limit_dataset(full, args.max_train_per_class, args.max_test)
    subset_of = {"train": getattr(ds.train.source, "indices", None), "test": getattr(ds.test.source, "indices", None)}
    ytr, yte = ds.train.labels, ds.test.labels
    header = "| option | mean ROCAUC % | " + " | ".join(ds.classes) + " | note |"
    lines = [f"{ds.name}: {len(ytr)} train, {len(yte)} test", "", header, "|" + "---|" * (len(ds.classes) + 3)]

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    print("\n".join(lines))
    backbones = [b for b in args.backbones.split(",") if b]
    embs = {}
    for b in backbones:  # plain embeddings of the full dataset (cached), restricted to the subset
        xtr, xte, secs = embed_splits(full, b, num_workers=1)
        embs[b] = (xtr if subset_of["train"] is None else xtr[subset_of["train"]],
                   xte if subset_of["test"] is None else xte[subset_of["test"]], secs)
    for b, (xtr, xte, secs) in embs.items():
        for norm in args.normalizations.split(","):
            t = time.perf_counter()
            emit(row(f"{b}, {norm}, k=2", unimodal_aucs(xtr, ytr, xte, yte, normalize=norm), f"{time.perf_counter() - t:.0f} s scoring"))
    for b in backbones[:1] + backbones[-1:]:
        xtr, xte, _ = embs[b]
        for k in [int(v) for v in args.ks.split(",") if int(v) != 2]:
            emit(row(f"{b}, sqrt_l2, k={k}", unimodal_aucs(xtr, ytr, xte, yte, k=k, normalize="sqrt_l2")))
    for r in range(2, len(backbones) + 1):
        for combo in itertools.combinations(backbones, r):
            for norm in ("l2", "sqrt_l2"):
                t = make_transform(norm, blocks=[embs[b][0].shape[1] for b in combo])  # Blockwise, as DN2 does
                xtr = t.transform(np.hstack([embs[b][0] for b in combo]))
                xte = t.transform(np.hstack([embs[b][1] for b in combo]))
                emit(row(f"{' + '.join(combo)}, {norm} each, concat", unimodal_aucs(xtr, ytr, xte, yte)))
    for option in [o for o in args.extract.split(",") if o]:
        for b in backbones:
            opts = {"flip": True} if option == "flip" else {"stages": (-2, -1)}
            xtr, xte, secs = embed_splits(ds, b, num_workers=1, **opts)
            for norm in ("l2", "sqrt_l2"):
                emit(row(f"{b}, {option}, {norm}", unimodal_aucs(xtr, ytr, xte, yte, normalize=norm), f"embedding {secs:.0f} s"))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
