"""How fast can a backbone possibly run here? FLOPs counted, compute peaks measured, model-only img/s.

Three tables:
1. FLOPs per 224 px image, counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add; the
   "7.8 GFLOPs" often quoted for ResNet-101 are multiply-adds, i.e. 15.6 GFLOP).
2. Peak throughput of this CPU in fp32 and bf16: torch matmul (MKL for fp32, oneDNN for bf16) and
   oneDNN convolutions of ResNet-shaped layers (channels-last, batch 32). The best of these is the
   compute roof: a network cannot run faster than FLOPs / peak, even before decoding any image.
3. Model-only img/s of the backbone (random weights, uint8 crops already in memory) in dn2's OpenVINO
   runner: fp32, bf16 with dn2's accuracy guard (early layers fp32, the default) and bf16 in
   every layer, with the fraction of the roof reached.

Usage (about 3 minutes on 2 cores):
    python benchmarks/roofline.py
    python benchmarks/roofline.py --backbones resnet101 --seconds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONV_SHAPES = [  # (in channels, out channels, kernel, spatial size): ResNet-101 layers at 224 px
    (64, 64, 3, 56), (128, 128, 3, 28), (256, 256, 3, 14), (512, 512, 3, 7),
    (256, 1024, 1, 14), (1024, 256, 1, 14), (2048, 512, 1, 7),
]


def count_gflop(backbone: str) -> float:
    """GFLOP per image at the backbone's crop size (2 per multiply-add), counted on its torch module."""
    from torch.utils.flop_counter import FlopCounterMode

    from dn2.backbones import load_backbone

    net = load_backbone(backbone, weights="random")
    crop = net.config.preprocessing.crop
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 3, crop, crop))
    return counter.get_total_flops() / 1e9


def _rate(fn, amount: float, seconds: float) -> float:
    """amount * calls per second of fn() (warm-up call excluded)."""
    fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        reps += 1
    return amount * reps / (time.perf_counter() - start)


def matmul_peak(dtype: torch.dtype, seconds: float) -> float:
    """Best torch matmul GFLOP/s over square sizes 1024-4096."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = max(best, _rate(lambda: a @ b, 2 * n**3 / 1e9, seconds))
    return best


@torch.inference_mode()
def conv_rates(dtype: torch.dtype, seconds: float, batch: int = 32) -> list[float]:
    """GFLOP/s of each CONV_SHAPES convolution (oneDNN, channels-last)."""
    rates = []
    for cin, cout, ks, hw in CONV_SHAPES:
        conv = torch.nn.Conv2d(cin, cout, ks, padding=ks // 2, bias=False).eval().to(dtype)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(batch, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
        rates.append(_rate(lambda: conv(x), 2 * batch * hw * hw * cin * cout * ks * ks / 1e9, seconds))
    return rates


def model_rate(backbone: str, precision: str, guard: bool, batch: int, seconds: float) -> float:
    """Model-only img/s of dn2's OpenVINO runner on a fixed uint8 batch."""
    from dn2.backbones import load_backbone
    from dn2.runtime import bf16, get_runner

    saved = bf16.BF16_FP32_PARTS
    bf16.BF16_FP32_PARTS = saved if guard else ()  # the runner is built (and cached) with this setting
    try:
        net = load_backbone(backbone, weights="random")
        runner = get_runner(net, "openvino", precision)
    finally:
        bf16.BF16_FP32_PARTS = saved
    if runner.name != "openvino":  # get_runner fell back to torch, with a warning saying why
        raise RuntimeError("OpenVINO is not available")
    crop = net.config.preprocessing.crop
    x = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    return _rate(lambda: runner(x), batch, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="efficientnet_lite0,resnet101", help="comma-separated")
    p.add_argument("--seconds", type=float, default=8.0, help="time per model-only measurement (default 8)")
    p.add_argument("--batch", type=int, default=16, help="model-only batch size (default 16, dn2's OpenVINO default)")
    args = p.parse_args(argv)
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))

    sys.path.insert(0, str(HERE))
    from machine import header

    print(header("Compute roofs: FLOPs per image, CPU peaks, model-only throughput"))
    print()
    peaks = {}
    print("| kernel | fp32 GFLOP/s | bf16 GFLOP/s |")
    print("| --- | ---: | ---: |")
    mm = {name: matmul_peak(dt, 1.5) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"| torch matmul, best of 1024^3..4096^3 | {mm['fp32']:.0f} | {mm['bf16']:.0f} |")
    convs = {name: conv_rates(dt, 1.5) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for i, (cin, cout, ks, hw) in enumerate(CONV_SHAPES):
        print(f"| conv {ks}x{ks} {cin}->{cout} at {hw}x{hw}, batch 32 | {convs['fp32'][i]:.0f} | {convs['bf16'][i]:.0f} |")
    for name in ("fp32", "bf16"):
        peaks[name] = max(mm[name], *convs[name])
    print(f"| **peak (best of the above)** | **{peaks['fp32']:.0f}** | **{peaks['bf16']:.0f}** |")
    print()
    print("| backbone | GFLOP/image | fp32 roof img/s | bf16 roof img/s | OpenVINO path | model-only img/s | % of its roof |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for backbone in args.backbones.split(","):
        gflop = count_gflop(backbone)
        roof = {name: peaks[name] / gflop for name in peaks}
        for label, precision, guard in (("fp32", "fp32", True), ("bf16, early layers fp32 (dn2 default)",
                                                                   "bf16", True), ("bf16 every layer", "bf16", False)):
            rate = model_rate(backbone, precision, guard, args.batch, args.seconds)
            print(f"| {backbone} | {gflop:.2f} | {roof['fp32']:.0f} | {roof['bf16']:.0f} | {label} | {rate:.1f} | "
                  f"{100 * rate / roof[precision]:.0f}% |", flush=True)
    print("\nroof = peak GFLOP/s / GFLOP per image; model-only excludes decoding and resizing, which share the "
          "same cores end to end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
