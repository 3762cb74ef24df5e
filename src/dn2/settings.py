"""Typed method settings: what a DN2 model computes, with the presets as instances.

A :class:`Method` says *what* is computed (backbone, k, embedding transform, pooled stages, flip
TTA, extraction precision, and the anomaly maps if asked for), never *how* it runs (batch size, workers, runtime, weights path):
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

__all__ = ["IMAGE_SCORES", "MAP_CORESET_DEFAULTS", "MAP_METHODS", "MAP_SETTINGS", "Method", "PRESETS",
           "PRECISION_CHOICES", "method_for"]

#: ``precision`` values a method may ask for; "auto" is resolved when the model is fitted (never to int8).
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")
#: Anomaly-map methods (:mod:`dn2.maps`); ``maps=None`` is image-level DN2 only.
MAP_METHODS = ("spade", "patchcore")
#: Image score of a model with maps: the image-level DN2 score, the map's (its largest patch distance),
#: or both combined (sum of their z-scores against the training leave-one-out scores).
IMAGE_SCORES = ("dn2", "map", "combined")
#: Share of the patches kept when ``map_coreset`` is not given, per method. SPADE: 25% of each image's
#: patches (almost no loss on MTD, a model and a search 4x smaller); PatchCore: 10% of all patches (1%
#: lost clearly on MTD). Measurements: docs/research/maps.md, Table 3.
MAP_CORESET_DEFAULTS = {"spade": 0.25, "patchcore": 0.1}
#: The map settings: stored in model files only when maps are on, so image-level files are unchanged.
MAP_SETTINGS = ("maps", "map_backbone", "map_size", "map_stages", "map_coreset", "map_k", "image_score")


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
        ``int8`` extra); the model then stores the quantised network (the maps' networks run in fp32).

    Anomaly maps (:mod:`dn2.maps`; all ignored while ``maps`` is None):

    maps: "spade" (the K nearest training images by the image-level embedding, then each location's
        nearest patch among theirs) or "patchcore" (one coreset bank of all training patches).
    map_backbone: backbone of the patch features (``"a+b"``: concatenated per location); None: ``backbone``.
    map_size: images are squashed to map_size x map_size for the patch features (every pixel scored).
    map_stages: stages whose outputs make the patch features (default: those at stride 8 and 16).
    map_coreset: share of the patches kept (None: :data:`MAP_CORESET_DEFAULTS`; resolved when fitted).
    map_k: SPADE's number of nearest training images.
    image_score: the image score of a model with maps, one of :data:`IMAGE_SCORES`. "dn2" (default):
        the image-level score, unchanged, because patch evidence hurt on semantic anomalies
        (CIFAR-10); "combined" helped on defect data (MTD) and is the choice for parts, textures and
        defects; "map": the map's largest patch distance alone (BENCHMARKS.md, "Anomaly maps").
    """

    backbone: str = DEFAULT_BACKBONE
    k: int = 2
    normalize: str = "none"
    stages: tuple[int, ...] = ()
    flip: bool = False
    precision: str = "auto"
    maps: str | None = None
    map_backbone: str | None = None
    map_size: int = 224
    map_stages: tuple[int, ...] = (-3, -2)
    map_coreset: float | None = None
    map_k: int = 10
    image_score: str = "dn2"

    constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        "backbone": [Predicate(_backbone_name, "a backbone name, or names joined by '+'")],
        "k": [Interval(int, 1, None)],
        "normalize": [Options(NORMALIZATIONS)],
        "stages": [TupleOf(Interval(int, None, None))],
        "flip": [InstanceOf(bool)],
        "precision": [Options(PRECISION_CHOICES)],
        "maps": [Options(MAP_METHODS), None],
        "map_backbone": [Predicate(_backbone_name, "a backbone name, or names joined by '+'"), None],
        "map_size": [Interval(int, 32, 1024)],
        "map_stages": [Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and
                                 TupleOf(Interval(int, None, None)).accepts(v), "a non-empty sequence of ints")],
        "map_coreset": [Interval(float, 0.0, 1.0, closed="right"), None],
        "map_k": [Interval(int, 1, None)],
        "image_score": [Options(IMAGE_SCORES)],
    }

    def __post_init__(self) -> None:
        for name in ("stages", "map_stages"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        validate("method", asdict(self), self.constraints)
        if self.maps is None and self.image_score != "dn2":
            raise ValueError(f"method: image_score={self.image_score!r} needs maps ('spade' or 'patchcore')")

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

    def fitted(self, precision: str) -> "Method":
        """The method a model records when fitted: ``precision`` resolved, and the map settings resolved
        (``map_backbone``, ``map_coreset``) or, without maps, at their defaults (they compute nothing)."""
        if self.maps is None:
            defaults = Method()
            return replace(self, precision=precision, **{name: getattr(defaults, name) for name in MAP_SETTINGS})
        coreset = MAP_CORESET_DEFAULTS[self.maps] if self.map_coreset is None else float(self.map_coreset)
        return replace(self, precision=precision, map_backbone=self.map_backbone or self.backbone, map_coreset=coreset)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (stages as lists), as stored in model files; the map settings only with maps."""
        out = asdict(self)
        out["stages"] = list(self.stages)
        out["map_stages"] = list(self.map_stages)
        if self.maps is None:
            for name in MAP_SETTINGS:
                del out[name]
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
        given = dict(values)
        for name in ("stages", "map_stages"):
            if isinstance(given.get(name), list):
                given[name] = tuple(given[name])
        return replace(base, **given)


#: ``paper``: the DN2 paper's method bit for bit (raw pooled last-stage features, Euclidean distance,
#: k=2, resize 256 / crop 224), on the default offline backbone, in fp32.
#: ``best``: the most accurate training-free combination measured on CIFAR-10 (BENCHMARKS.md, "Beyond the
#: paper"): the EfficientNet-Lite0 + Lite2 ensemble, each backbone's features Hellinger-normalised
#: (signed square root + L2) on their own, k=2. Flip TTA and multi-stage pooling were measured and did
#: not help, so they are off. Its maps (when asked for) use Lite2 alone: the best maps of the offline
#: backbones on MTD, and the Lite0+Lite2 concatenation was no better (docs/research/maps.md, Table 1b).
PRESETS: dict[str, Method] = {
    "paper": Method(backbone=DEFAULT_BACKBONE, k=2, normalize="none"),
    "best": Method(backbone="efficientnet_lite0+efficientnet_lite2", k=2, normalize="sqrt_l2",
                   map_backbone="efficientnet_lite2"),
}


def method_for(preset: str, **overrides: Any) -> Method:
    """The preset's method with the explicitly given settings (not ``None``) laid over it."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset].overlay(**overrides)
