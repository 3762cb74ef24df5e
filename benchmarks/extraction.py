"""Feature-extraction speed, end to end from JPEG files on disk: img/s of three pipelines side by side.

(a) plain: torchvision ``ImageFolder`` + ``DataLoader(num_workers=2, batch_size=64)`` + the model
    with its classifier replaced by Identity, Resize(256)/CenterCrop(224)/ToTensor/Normalize, fp32
    eager, no dn2 (so no malloc tuning);
(b) dn2 torch fp32 (``dn2.features.extract(runtime="torch", precision="fp32")``);
(c) dn2 OpenVINO fp32 (``runtime="openvino", precision="fp32"``);
(d) dn2 torch bf16 (``runtime="torch", precision="bf16"``: autocast, early layers in fp32);
(e) dn2's default (``runtime="auto", precision="auto"``: OpenVINO, bf16 on CPUs with native bf16).

Each pipeline runs in its own subprocess on the same images (the first ``n`` files in ImageFolder
order, where ``n`` is what (a) processed within ``--seconds``), with random weights. Model loading,
ONNX/OpenVINO conversion and one warm-up batch are excluded; decoding, resizing and inference are timed.

Usage (full run, about 15 minutes on 2 cores):
    python benchmarks/extraction.py
    python benchmarks/extraction.py --images 200 --backbones efficientnet_lite0   # quick check
    python benchmarks/extraction.py --source synthetic                             # 256x256 JPEGs
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CIFAR_ZIP = HERE.parents[1] / "shared" / "datasets" / "cifar10-jpeg.zip"


# ------------------------------------------------------------------------------------------ images


def write_cifar(root: Path, n: int, zip_path: Path = CIFAR_ZIP) -> None:
    """The first n training JPEGs of the CIFAR-10 zip (round robin over classes) in ImageFolder layout."""
    with zipfile.ZipFile(zip_path) as zf:
        by_class: dict[str, list[str]] = {}
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "train" and parts[2].lower().endswith((".jpg", ".jpeg")):
                by_class.setdefault(parts[1], []).append(name)
        classes = sorted(by_class)
        for i in range(n):
            cls = classes[i % len(classes)]
            member = by_class[cls][i // len(classes)]
            out = root / cls / Path(member).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(member))


def write_synthetic(root: Path, n: int, size: int = 256, classes: int = 10) -> None:
    """n smooth random 256x256 RGB JPEGs (quality 90): photo-like file sizes and decode cost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 8, (3, 2))
        phase = rng.uniform(0, 6.3, (3, 1, 1))
        rgb = 127 + 100 * np.sin(2 * np.pi * (f[:, :1, None] * xx + f[:, 1:, None] * yy) + phase)
        rgb = rgb.transpose(1, 2, 0) + rng.normal(0, 12, (size, size, 3))
        out = root / f"class{i % classes}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, quality=90)


def imagefolder_files(root: Path) -> list[str]:
    """Files in torchvision ImageFolder order: sorted class folders, sorted files within each."""
    return [str(p) for d in sorted(p for p in root.iterdir() if p.is_dir()) for p in sorted(d.iterdir())]


# ------------------------------------------------------------------------------------------ workers


def run_plain(backbone: str, root: str, limit: int, seconds: float) -> dict:
    """(a) torchvision ImageFolder + DataLoader + fp32 eager model; stops after `seconds` (whole batches)."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms as T

    if backbone.startswith("efficientnet_lite"):
        import timm

        model = timm.create_model(f"tf_{backbone}", pretrained=False, num_classes=0)
    else:
        model = torchvision.models.get_model(backbone, weights=None)
        model.fc = torch.nn.Identity()
    model.eval()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = torchvision.datasets.ImageFolder(root, transform=tf)
    data = Subset(data, range(min(limit, len(data))))
    with torch.inference_mode():
        model(torch.zeros(64, 3, 224, 224))  # warm-up
        start, n = time.perf_counter(), 0
        for x, _ in DataLoader(data, batch_size=64, num_workers=2):
            model(x).numpy()
            n += len(x)
            if time.perf_counter() - start > seconds:
                break
        elapsed = time.perf_counter() - start
    return {"n": n, "seconds": elapsed}


def run_dn2(backbone: str, root: str, limit: int, runtime: str, precision: str, batch_size: int | None) -> dict:
    """(b)-(e) dn2.features.extract on the first `limit` files with the given runtime and precision."""
    from dn2.backbones import load_backbone
    from dn2.features import extract
    from dn2.runtime import resolve_precision, resolve_runtime

    files = imagefolder_files(Path(root))[:limit]
    net = load_backbone(backbone, weights="random")
    # Warm-up: ONNX/OpenVINO conversion (cached afterwards) and first-call kernel setup.
    extract(net, files[:16], runtime=runtime, precision=precision, progress=False, num_workers=0, batch_size=batch_size)
    start = time.perf_counter()
    emb = extract(net, files, runtime=runtime, precision=precision, progress=False, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    resolved = resolve_precision(precision)
    return {"n": len(emb.vectors), "seconds": elapsed, "resolved": f"{resolve_runtime(runtime, resolved)} {resolved}"}


def in_subprocess(job: dict) -> dict:
    """Run one pipeline in a fresh interpreter (separate malloc settings, thread pools, caches)."""
    out = subprocess.run([sys.executable, __file__, "--_job", json.dumps(job)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="JPEG files to write (default 2000)")
    p.add_argument("--source", choices=["cifar", "synthetic"], default="cifar",
                   help="CIFAR-10 JPEGs (32x32) from ../shared/datasets/cifar10-jpeg.zip, or 256x256 synthetic JPEGs")
    p.add_argument("--backbones", default="efficientnet_lite0,resnet101", help="comma-separated")
    p.add_argument("--seconds", type=float, default=300.0,
                   help="time cap of the plain pipeline per backbone; the others get the same images (default 300)")
    p.add_argument("--fast-batch", type=int, default=None, help="batch size of the default path (e) (default: dn2's)")
    p.add_argument("--pipelines", default="b,c,d,e", help="dn2 pipelines to run beside the plain one (a)")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._job:
        job = json.loads(args._job)
        kind = job.pop("kind")
        result = run_plain(**job) if kind == "plain" else run_dn2(**job)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(HERE))
    import torch
    from machine import header
    from roofline import CONV_SHAPES, conv_rates, count_gflop

    print(header("dn2 feature extraction, end to end from JPEG files"))
    gflops, bf16_gflops = (max(conv_rates(dt, 1.0)) for dt in (torch.float32, torch.bfloat16))
    print(f"- compute peaks: fp32 {gflops:.0f} GFLOP/s, bf16 {bf16_gflops:.0f} GFLOP/s (best of {len(CONV_SHAPES)} "
          "ResNet-shaped oneDNN convolutions, benchmarks/roofline.py)")
    print(f"- images: {args.images} {args.source} JPEGs; plain pipeline capped at {args.seconds:.0f} s per backbone\n")

    pipelines = {
        "b": ("dn2 torch fp32 (b)", "torch", "fp32", None),
        "c": ("dn2 OpenVINO fp32 (c)", "openvino", "fp32", None),
        "d": ("dn2 torch bf16, early layers fp32 (d)", "torch", "bf16", None),
        "e": ("dn2 default: runtime=auto, precision=auto (e)", "auto", "auto", args.fast_batch),
    }
    tmp = Path(tempfile.mkdtemp(prefix="dn2-extraction-"))
    try:
        (write_cifar if args.source == "cifar" else write_synthetic)(tmp / "images", args.images)
        root = str(tmp / "images")
        rows = []
        for backbone in args.backbones.split(","):
            plain = in_subprocess({"kind": "plain", "backbone": backbone, "root": root,
                                   "limit": args.images, "seconds": args.seconds})
            n = plain["n"]
            runs = [("plain torchvision fp32 eager (a)", plain)]
            for key in args.pipelines.split(","):
                label, runtime, precision, batch = pipelines[key]
                r = in_subprocess({"kind": "dn2", "backbone": backbone, "root": root, "limit": n,
                                   "runtime": runtime, "precision": precision, "batch_size": batch})
                runs.append((f"{label} -> {r['resolved']}", r))
            base = n / plain["seconds"]
            gflop = count_gflop(backbone)
            for name, r in runs:
                rate = r["n"] / r["seconds"]
                rows.append(f"| {backbone} | {name} | {r['n']} | {r['seconds']:.1f} | {rate:.1f} | "
                            f"{rate / base:.2f}x | {gflops / gflop:.0f} | {bf16_gflops / gflop:.0f} |")
            print(f"{backbone}: done", file=sys.stderr)
        print("| backbone | pipeline | images | seconds | img/s | vs (a) | fp32 roof img/s | bf16 roof img/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(rows))
        print("\nroof = peak GFLOP/s / GFLOP per image (counted, 2 per multiply-add: EfficientNet-Lite0 0.77, "
              "ResNet-101 15.6): a network cannot run faster than all its convolutions at the best one's speed.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
