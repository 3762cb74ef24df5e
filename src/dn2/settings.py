"""Typed method settings: what a DN2 model computes, with the presets as instances.

A :class:`Method` says *what* is computed (backbone, k, embedding transform, pooled stages, flip
TTA, extraction precision), never *how* it runs (batch size, workers, runtime, weights path):
those are the caller's. Presets are ``Method`` instances; explicit settings are laid over a preset
with :meth:`Method.overlay` (``dataclasses.replace`` with the values that were given), as timm
overlays a ``pretrained_cfg``. A fitted model records its method with the precision resolved for
the machine it was fitted on, and scores with exactly that method again.

Example:
    >>> from dn2.settings import PRESETS
    >>> PRESETS["paper"].overlay(k=5).k
    5
    >>> PRESETS["best"].normalize
    'sqrt_l2'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

from .backbones import DEFAULT_BACKBONE
from .normalize import NORMALIZATIONS, transform_class
from .params import Constraint, InstanceOf, Interval, Options, Predicate, TupleOf, validate

__all__ = ["Method", "PRESETS", "PRECISION_CHOICES", "method_for"]

#: ``precision`` values a method may ask for; "auto" is resolved when the model is fitted (never to int8).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")


def _backbone_name(value: Any) -> bool:
    return isinstance(value, str) and all(part.strip() for part in value.split("+"))


@dataclass(frozen=True)
class Method:
    """The settings that determine a model's embeddings and scores.

    backbone: registry name, ``timm:<model>``, or ``"a+b"`` for an ensemble (embeddings concatenated).
    k: neighbours averaged in the score (the paper's d(y)).
    normalize: embedding transform before the search (:mod:`dn2.normalize`).
    stages: earlier stages pooled into the embedding as well (indices, negative from the deepest).
    flip: average each embedding with its mirror image's.
    precision: extraction precision; "auto" is bf16 where the CPU runs it natively and the
        transform is ``bf16_safe`` (measured harmless there), else fp32. A fitted model stores the
        precision it resolved to. "int8" quantises the backbone on the fit images (OpenVINO and the
        ``int8`` extra); the model then stores the quantised network.
    """

    backbone: str = DEFAULT_BACKBONE
    k: int = 2
    normalize: str = "none"
    stages: tuple[int, ...] = ()
    flip: bool = False
    precision: str = "auto"

    constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        "backbone": [Predicate(_backbone_name, "a backbone name, or names joined by '+'")],
        "k": [Interval(int, 1, None)],
        "normalize": [Options(NORMALIZATIONS)],
        "stages": [TupleOf(Interval(int, None, None))],
        "flip": [InstanceOf(bool)],
        "precision": [Options(PRECISION_CHOICES)],
    }

    def __post_init__(self) -> None:
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        validate("method", asdict(self), self.constraints)

    def overlay(self, **changes: Any) -> "Method":
        """This method with the given settings replaced; ``None`` values mean "keep the preset's"."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})

    def extraction_precision(self) -> str:
        """``precision`` with "auto" narrowed by the transform: "fp32" unless it is ``bf16_safe``.

        The runtime resolves a remaining "auto" by the CPU (bf16 only where native).
        """
        if self.precision == "auto" and not transform_class(self.normalize).bf16_safe:
            return "fp32"
        return self.precision

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (stages as a list), as stored in model files."""
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, defaults: "Method | None" = None) -> "Method":
        """Settings read from a model file: unknown names are refused, missing ones take ``defaults``."""
        names = {f.name for f in fields(cls) if f.name != "constraints"}
        if not isinstance(values, dict):
            raise ValueError(f"method settings must be a mapping, got {type(values).__name__}")
        extra = sorted(set(values) - names)
        if extra:
            raise ValueError(f"unknown method settings {extra} (written by a newer dn2?)")
        base = defaults or cls()
        stages = values.get("stages")
        given = dict(values, stages=tuple(stages)) if isinstance(stages, list) else dict(values)
        return replace(base, **given)


#: ``paper``: the DN2 paper's method bit for bit (raw pooled last-stage features, Euclidean distance,
#: k=2, resize 256 / crop 224), on the default offline backbone, in fp32.
#: ``best``: the most accurate training-free combination measured on CIFAR-10 (BENCHMARKS.md, "Beyond the
#: paper"): the EfficientNet-Lite0 + Lite2 ensemble, each backbone's features Hellinger-normalised
#: (signed square root + L2) on their own, k=2. Flip TTA and multi-stage pooling were measured and did
#: not help, so they are off.
PRESETS: dict[str, Method] = {
    "paper": Method(backbone=DEFAULT_BACKBONE, k=2, normalize="none"),
    "best": Method(backbone="efficientnet_lite0+efficientnet_lite2", k=2, normalize="sqrt_l2"),
}


def method_for(preset: str, **overrides: Any) -> Method:
    """The preset's method with the explicitly given settings (not ``None``) laid over it."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset].overlay(**overrides)
