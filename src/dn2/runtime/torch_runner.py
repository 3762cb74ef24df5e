"""Eager PyTorch: the runtime that is always there, in fp32 or bf16 autocast with the early layers fp32.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> runner = TorchRunner.build(load_backbone("efficientnet_lite0"), "fp32")
    >>> runner(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 1280])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable

import torch
from torch.func import functional_call

from .base import Runner
from .bf16 import mixed_bf16

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    """The backbone module itself, run eagerly with channels-last convolution weights.

    oneDNN's convolutions are fastest on channels-last tensors, but converting the caller's module
    (``module.to(memory_format=...)``) would change it under their feet. The runner keeps its own
    channels-last copies of the 4-D weights and runs the module with them (``torch.func.functional_call``):
    the module's own tensors are swapped back when each call returns. With ``precision="bf16"``
    the call runs under :func:`~dn2.runtime.bf16.mixed_bf16`, whose fp32 wrappers are removed on exit too.
    Not for concurrent use from several threads on one module (neither is the module).
    """

    name = "torch"
    precisions = frozenset({"fp32", "bf16"})
    default_batch_size = 8  # eager PyTorch is fastest with small batches that stay in the CPU caches
    input_memory_format = torch.channels_last

    def __init__(self, backbone: "Backbone", precision: str = "fp32"):
        if precision not in self.precisions:
            raise ValueError(f"TorchRunner runs {sorted(self.precisions)}, not {precision!r}")
        self.module = backbone
        self.precision = precision
        with torch.no_grad():
            tensors = [*backbone.named_parameters(), *backbone.named_buffers()]
            self.weights = {name: t.detach().to(memory_format=torch.channels_last)
                            for name, t in tensors if t.dim() == 4}

    @classmethod
    def build(cls, backbone: "Backbone", precision: str, **int8: Any) -> "TorchRunner":
        """The runner of ``backbone`` (nothing to convert: the copies of the conv weights are made here).

        It runs no calibrated precision, so ``calibration``/``network`` never reach it."""
        return cls(backbone, precision)

    @classmethod
    def cache_key(cls, backbone: "Backbone", precision: str, **int8: Any) -> Hashable:
        # It runs this very module, so it is keyed by the object too: two loads of one backbone share
        # compiled runners (converted from the same weights file), not eager ones (a module may have
        # been changed in place since it was loaded).
        return (*super().cache_key(backbone, precision), id(backbone))  # type: ignore[misc]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), mixed_bf16(self.module, enabled=self.precision == "bf16"):
            out = functional_call(self.module, self.weights, (batch,))
        return out.float()
