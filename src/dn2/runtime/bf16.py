"""bf16 without the accuracy loss: which layers of a backbone stay fp32, and autocast around the rest.

Rounding errors made at high resolution are amplified by every later layer, so with
``precision="bf16"`` the early layers (:data:`BF16_FP32_PARTS` of :func:`bf16_parts`) run in fp32
in both runtimes: OpenVINO compiles them as a separate fp32 piece, PyTorch runs them with autocast
disabled (:func:`mixed_bf16`). The measurements behind the choice are in BENCHMARKS.md.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> net = load_backbone("efficientnet_lite0")
    >>> [name for name, _ in bf16_parts(net)]
    ['early', 'middle', 'head']
    >>> with torch.inference_mode(), mixed_bf16(net):
    ...     net(torch.zeros(1, 3, 64, 64)).dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["BF16_FP32_PARTS", "bf16_autocast", "bf16_parts", "fp32_forward", "fp32_modules", "fp32_parts", "mixed_bf16"]

# Which pieces of a split network (:func:`bf16_parts`) run in fp32 when precision="bf16", in both runtimes.
# Measured on CIFAR-10 with EfficientNet-Lite0 (BENCHMARKS.md): bf16 everywhere cost 0.28 ROCAUC points
# (raw features); keeping only the stem conv and the head in fp32 still 0.24. The error is made early: the
# high-resolution layers' rounding is amplified by all later ones (median embedding error 7% -> 2% with
# the first two EfficientNet stages in fp32; later stages in fp32 changed nothing). The head in fp32 as
# well (the first guard) changed neither the embedding error (0.0205 vs 0.0206) nor the ROCAUC (Lite0
# -0.220 vs -0.222 raw, -0.058 vs -0.057 sqrt_l2) and cost ResNet-101 6% of its speed: early only.
# Read at call time, so experiments (benchmarks/fastpath_accuracy.py, roofline.py) may rebind it; runner
# caches and the embedding cache are keyed by it. ``dn2.runtime.BF16_FP32_PARTS`` is the same setting.
BF16_FP32_PARTS: tuple[str, ...] = ("early",)


def fp32_parts() -> tuple[str, ...]:
    """The current :data:`BF16_FP32_PARTS`, for other modules (a from-import would copy the old value)."""
    return BF16_FP32_PARTS


def bf16_parts(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]] | None:
    """The backbone's layers as named pieces early -> middle -> head, whose composition is its forward.

    early: the stem and the layers up to and including the first stage at stride 4 (EfficientNet:
    conv_stem, bn1, blocks 0-1; ResNet: conv1, bn1, relu, maxpool, layer1); head: the last
    convolution block and the global pooling (EfficientNet: conv_head, bn2, pooling; ResNet: the last
    block of layer4, pooling); middle: the rest. None for networks of another structure or with extra
    ``stages`` (hooks), which then run in bf16 with only :func:`fp32_modules`' structural guard.
    A network that knows its own pieces says so with a ``bf16_parts()`` method (e.g. the patch-feature
    network of :mod:`dn2.maps.patches`, whose early piece is its backbone's); that answer is used.
    """
    own = getattr(backbone, "bf16_parts", None)
    if callable(own):
        return own()
    body = getattr(backbone, "body", backbone)
    if getattr(backbone, "stages", ()):
        return None
    if all(hasattr(body, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        return [("early", [body.conv_stem, body.bn1, body.blocks[0], body.blocks[1]]), ("middle", [body.blocks[2:]]),
                ("head", [body.conv_head, body.bn2, body.global_pool])]
    if all(hasattr(body, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool")) and isinstance(
            getattr(body, "fc", None), nn.Identity):
        return [("early", [body.conv1, body.bn1, body.relu, body.maxpool, body.layer1]),
                ("middle", [body.layer2, body.layer3, body.layer4[:-1]]), ("head", [body.layer4[-1], body.avgpool])]
    return None


def fp32_modules(backbone: nn.Module) -> list[nn.Module]:
    """The layers :func:`mixed_bf16` keeps in fp32: those of the :data:`BF16_FP32_PARTS` of :func:`bf16_parts`.

    For networks bf16_parts does not know (or with ``stages``), found by structure: the first and last
    ``Conv2d`` and ``BatchNorm2d`` (timm's ``BatchNormAct2d`` is a subclass, so its activation is
    included) in module order, and every adaptive-average or timm global pooling module.
    """
    parts = bf16_parts(backbone)
    if parts is not None:
        return [m for name, modules in parts if name in BF16_FP32_PARTS for m in modules]
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [
        m for m in backbone.modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) or type(m).__name__ == "SelectAdaptivePool2d"
    ]
    keep: list[nn.Module] = []
    for m in [convs[:1], norms[:1], convs[-1:], norms[-1:], pools]:
        for module in m:
            if all(module is not k for k in keep):
                keep.append(module)
    return keep


def fp32_forward(forward: Callable) -> Callable:
    """``forward`` run in fp32 inside a bf16 autocast region: float inputs cast up, autocast disabled."""

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast("cpu", enabled=False):
            return forward(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def bf16_autocast(fp32: Sequence[nn.Module] = ()) -> Iterator[None]:
    """CPU bf16 autocast in which the modules ``fp32`` run in fp32 (their forward wrapped by :func:`fp32_forward`).

    The wrappers are instance attributes removed on exit, so the modules are left as they were.
    """
    for m in fp32:
        m.forward = fp32_forward(m.forward)  # instance attribute shadows the class method
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for m in fp32:
            del m.forward


@contextlib.contextmanager
def mixed_bf16(backbone: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    """bf16 autocast for ``backbone`` with the accuracy-critical layers of :func:`fp32_modules` in fp32.

    Yields the kept modules. ``enabled=False`` is a no-op (yields an empty list).
    """
    if not enabled:
        yield []
        return
    keep = fp32_modules(backbone)
    with bf16_autocast(keep):
        yield keep
