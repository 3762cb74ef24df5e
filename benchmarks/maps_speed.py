"""Cost of anomaly maps with the default settings: fit on 200 normal images of ~900 x 900, score 100.

The issue's target: under 2 minutes for both, a model file under 100 MB, memory bounded. The images
are Magnetic Tile Defects images upscaled to 900 x 900 and saved as JPEG (quality 95) in a temporary
folder, so the times include reading and decoding files: 200 defect-free images to fit, 50
defect-free + 50 defective to score. Prints a markdown table (and writes it with --out).

    python benchmarks/maps_speed.py [--maps spade] [--data magnetic-tile-defects.zip] [--out docs/bench/maps/speed.md]

Timings on a shared machine are provisional: the load average before and after each phase is printed
beside them, with the CPU's features (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header  # noqa: E402

import dn2  # noqa: E402
from dn2.bench.localize import peak_memory  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic-tile-defects.zip"


def make_images(zip_path: Path, folder: Path, n_train: int, n_normal: int, n_defect: int, side: int) -> tuple[Path, Path]:
    """train/ and test/ folders of JPEGs upscaled to side x side from the MTD archive."""
    train, test = folder / "train", folder / "test"
    train.mkdir()
    test.mkdir()
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        free = sorted(n for n in names if n.startswith("MT_Free/Imgs/") and n.endswith(".jpg"))
        defects = sorted(n for n in names if n.endswith(".jpg") and not n.startswith("MT_Free"))
        picks = [(train, n) for n in free[:n_train]] + [(test, n) for n in free[-n_normal:]] \
            + [(test, n) for n in defects[::max(1, len(defects) // n_defect)][:n_defect]]
        for target, name in picks:
            image = Image.open(io.BytesIO(z.read(name))).convert("RGB").resize((side, side), Image.BICUBIC)
            image.save(target / name.replace("/", "_"), quality=95)
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED), help="the Magnetic Tile Defects zip")
    parser.add_argument("--maps", default="spade", help="spade (default) or patchcore")
    parser.add_argument("--image-score", default=None, help="image score rule (default: the method's default, dn2)")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--side", type=int, default=900)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()

    lines = [header(f"Anomaly maps: fit {args.train} + score {args.test} images of {args.side} x {args.side} ({args.maps})"), ""]
    with tempfile.TemporaryDirectory() as tmp:
        train, test = make_images(Path(args.data), Path(tmp), args.train, args.test // 2, args.test - args.test // 2,
                                  args.side)
        model = dn2.DN2(maps=args.maps, image_score=args.image_score, progress=False)
        load0 = os.getloadavg()[0]
        peak_memory(reset=True)
        start = time.perf_counter()
        model.fit(train)
        fit_s, fit_peak, load1 = time.perf_counter() - start, peak_memory(), os.getloadavg()[0]
        peak_memory(reset=True)
        start = time.perf_counter()
        maps = 0
        for result in model.localize(test):
            result.map()  # the full-resolution map of every image, as anomaly_map gives
            maps += 1
        score_s, score_peak, load2 = time.perf_counter() - start, peak_memory(), os.getloadavg()[0]
        size = os.path.getsize(model.save(Path(tmp) / "model.dn2")) / 2**20
    m = model.method_
    lines += [
        f"- method: maps={m.maps}, map_backbone={m.map_backbone}, map_size={m.map_size}, map_coreset={m.map_coreset}, "
        f"map_k={m.map_k}, image_score={m.image_score}; image level: {m.backbone} ({m.normalize}); precision {m.precision}",
        f"- {len(model.maps_.memory.patches):,} patches of {model.maps_.memory.patches.shape[1]} floats kept; "
        f"pixel threshold {model.pixel_threshold_:.3f}",
        "",
        "| phase | images | seconds | peak RSS MiB | load average (start / end) |",
        "|---|---:|---:|---:|---|",
        f"| fit (both passes, coreset, leave-one-out thresholds) | {args.train} | {fit_s:.1f} | {fit_peak:.0f} | {load0:.1f} / {load1:.1f} |",
        f"| score (image level + maps at full resolution) | {maps} | {score_s:.1f} | {score_peak:.0f} | {load1:.1f} / {load2:.1f} |",
        f"| **total** | | **{fit_s + score_s:.1f}** | | |",
        "",
        f"- model file: {size:.1f} MiB",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
