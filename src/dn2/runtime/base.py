"""The contract every runtime meets (:class:`Runner`) and the precisions runners may declare.

A runner is a backbone made ready to run by one runtime at one precision: called on a batch of crops,
it returns (N, D) float32 embeddings. What it can do is declared as class data, read by
:func:`dn2.runtime.resolve_runtime` and :func:`dn2.features.extract` instead of probing objects:

- ``name``: the runtime's name ("torch", "onnx", "openvino");
- ``precisions``: the precisions it can run (keys of :data:`PRECISION_TABLE`);
- ``uint8_input``: the image normalisation is folded into its graph, so it takes the uint8 crops
  as they are; otherwise it takes normalised float32 input in ``input_memory_format``;
- ``default_batch_size``: the batch size measured fastest for it (BENCHMARKS.md).

Example:
    >>> from dn2.runtime.base import PRECISION_TABLE
    >>> from dn2.runtime.cpu import cpu_features
    >>> sorted(PRECISION_TABLE)
    ['bf16', 'fp32', 'int8']
    >>> PRECISION_TABLE["fp32"].is_native(cpu_features())  # fp32 needs no special instructions
    True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Hashable

import torch

from .bf16 import fp32_parts
from .cpu import BF16_NATIVE_FEATURES, INT8_NATIVE_FEATURES, CpuFeatures
from .exports import backbone_identity

if TYPE_CHECKING:
    from ..backbones import Backbone
    from .int8 import Calibration, QuantizedNetwork

__all__ = [
    "AUTO_PRECISION_ORDER",
    "PRECISION_TABLE",
    "Precision",
    "Runner",
]


@dataclass(frozen=True)
class Precision:
    """A numeric precision a runner may declare, and on which CPUs it is native (fast).

    ``native_on``: :class:`~dn2.runtime.cpu.CpuFeatures` names of which any one makes it native;
    empty means native everywhere. Only native precisions are candidates for ``precision="auto"``.
    ``calibrated``: the network is derived from sample images (int8's quantisation ranges), so a
    runner of this precision needs a calibration or the network it produced (:func:`dn2.runtime.get_runner`).
    """

    name: str
    native_on: tuple[str, ...] = ()
    description: str = ""
    calibrated: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.native_on) - set(CpuFeatures.names())
        if unknown:
            raise ValueError(f"precision {self.name!r}: unknown CPU features {sorted(unknown)}")

    def is_native(self, features: CpuFeatures) -> bool:
        """True when ``features`` run this precision natively."""
        return not self.native_on or features.has_any(self.native_on)


# Every precision dn2 knows. A new one is one entry here, plus its name in the ``precisions`` of the
# runners that can run it; "auto" considers it only if listed in AUTO_PRECISION_ORDER (a precision
# that costs accuracy should be asked for, not chosen).
PRECISION_TABLE: dict[str, Precision] = {
    "fp32": Precision("fp32", description="float32 everywhere: the reference numerics"),
    "bf16": Precision("bf16", native_on=BF16_NATIVE_FEATURES,
                      description="bfloat16 matrix arithmetic with the early layers in fp32 (BF16_FP32_PARTS)"),
    "int8": Precision("int8", native_on=INT8_NATIVE_FEATURES, calibrated=True,
                      description="int8 convolutions quantised on the fit images (NNCF; early layers and depthwise "
                                  "convolutions in fp32; 7-bit weights: same results with or without VNNI); OpenVINO"),
}

# What "auto" picks, first native one wins (fp32 is native everywhere). bf16 is listed: its accuracy
# cost was measured negligible after the transforms that declare ``bf16_safe`` (dn2.normalize); dn2.settings.Method
# narrows "auto" to fp32 for the others before it gets here. int8 is not listed, on purpose (BENCHMARKS.md,
# "int8"): for EfficientNet-Lite (both presets) it gains little over fp32 and nothing over the bf16 guard, and
# its per-fit calibration is a large part of a small fit; ResNet-class networks gain more, but their int8
# accuracy could not be measured (no offline ImageNet weights), and "auto" must not choose what was not
# measured both faster and within the accuracy budget. Ask for it: precision="int8".
AUTO_PRECISION_ORDER: tuple[str, ...] = ("bf16", "fp32")


class Runner(ABC):
    """A backbone ready to run in one runtime at one precision: uint8 or float batch in, embeddings out.

    Subclasses declare their capabilities as class attributes (see the module docstring) and build
    themselves with :meth:`build`; :func:`dn2.runtime.get_runner` chooses, builds and caches them.
    """

    name: ClassVar[str]
    precisions: ClassVar[frozenset[str]]
    default_batch_size: ClassVar[int]
    uint8_input: ClassVar[bool] = False
    input_memory_format: ClassVar[torch.memory_format] = torch.contiguous_format
    requirement: ClassVar[str] = ""  # what to install when available() is False, for the warning

    precision: str  # the precision this instance runs

    @classmethod
    def available(cls) -> bool:
        """Whether the runtime's packages are installed (checked without importing them)."""
        return True

    @classmethod
    @abstractmethod
    def build(cls, backbone: "Backbone", precision: str, *, calibration: "Calibration | None" = None,
              network: "QuantizedNetwork | None" = None) -> "Runner":
        """Convert/compile ``backbone`` for ``precision`` (one of :attr:`precisions`); raises if that fails.

        A ``calibrated`` precision (int8) is built from the ``calibration`` images, or runs the ``network``
        they produced before (from a model file); :func:`dn2.runtime.get_runner` checks that exactly one is given.
        """

    @classmethod
    def cache_key(cls, backbone: "Backbone", precision: str, *, calibration: "Calibration | None" = None,
                  network: "QuantizedNetwork | None" = None) -> Hashable:
        """What makes two runners interchangeable: runtime, precision (bf16: with its fp32 pieces; int8: the
        calibration sample's digest or the network's sha256), backbone identity."""
        parts: tuple[str, ...] = fp32_parts() if precision == "bf16" else ()
        if network is not None:
            parts = ("network", network.sha256)
        elif calibration is not None:
            parts = ("calibration", calibration.digest)
        return (cls.name, precision, parts, *backbone_identity(backbone))

    @abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 embeddings of a (N, 3, H, W) batch: uint8 crops if :attr:`uint8_input`, else normalised."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r})"
