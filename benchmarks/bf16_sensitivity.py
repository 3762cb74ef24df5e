"""Where does bf16 lose precision? Embedding error of EfficientNet-Lite0 with different layers kept in fp32.

Runs 256 random CIFAR-10 test images through the backbone under PyTorch bf16 autocast, with a chosen
set of modules forced to fp32 (dn2.runtime.bf16.bf16_autocast, the mechanism of mixed_bf16), and
prints the relative embedding error ||e_bf16 - e_fp32|| / ||e_fp32|| (median, 99th percentile, max)
and the relative error of the embedding norm. This is how dn2's guard (dn2.runtime.bf16.BF16_FP32_PARTS:
the early high-resolution layers; the head in fp32 too made no difference) was chosen.

Usage:
    python benchmarks/bf16_sensitivity.py --data ../shared/datasets/cifar10-jpeg.zip
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dn2.backbones import load_backbone
from dn2.datasets import load_dataset
from dn2.features import CropDataset, normalize
from dn2.runtime.bf16 import bf16_autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    net = load_backbone("efficientnet_lite0").eval()
    body, pre = net.body, net.config.preprocessing
    src = load_dataset(args.data).test.source
    crops = CropDataset(src, pre)
    idx = np.random.default_rng(0).choice(len(src), args.images, replace=False)
    x = normalize(torch.stack([crops[int(i)][0] for i in idx]), pre)
    with torch.inference_mode():
        ref = net(x)

    def error(keep: list[torch.nn.Module]) -> str:
        with torch.inference_mode(), bf16_autocast(fp32=keep):
            out = net(x).float()
        rel = ((out - ref).norm(dim=1) / ref.norm(dim=1)).numpy()
        norm = (out.norm(dim=1) / ref.norm(dim=1) - 1).abs().numpy()
        return (f"| {np.median(rel):.4f} | {np.quantile(rel, 0.99):.4f} | {rel.max():.4f} | "
                f"{np.median(norm):.4f} | {norm.max():.4f} |")

    stem_head = [body.conv_stem, body.bn1, body.conv_head, body.bn2, body.global_pool]
    rows = [("all bf16 (plain autocast)", []), ("stem conv + head fp32", stem_head)]
    rows += [(f"stem + head + blocks[{i}] fp32", stem_head + [body.blocks[i]]) for i in range(len(body.blocks))]
    rows += [("stem + head + blocks[0:2] fp32 (dn2's guard)", stem_head + list(body.blocks[:2])),
             ("stem + head + blocks[0:3] fp32", stem_head + list(body.blocks[:3])),
             ("stem + head + blocks[3:] fp32", stem_head + list(body.blocks[3:])),
             ("stem + blocks[0:2] fp32, head bf16", [body.conv_stem, body.bn1, *body.blocks[:2]])]
    print(f"EfficientNet-Lite0, {args.images} CIFAR-10 test images, bf16 autocast vs fp32\n")
    print("| fp32 layers | rel. error median | p99 | max | norm error median | max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, keep in rows:
        print(f"| {name} {error(keep)}", flush=True)


if __name__ == "__main__":
    main()
