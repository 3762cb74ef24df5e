"""What identifies an exported network, and where exports are cached on disk.

The runtimes that convert a backbone (OpenVINO, ONNX) name their files by :func:`export_cache_key`
under :func:`runtime_cache_dir`, so a changed backbone, weights file, crop, set of stages, dn2 or
torch version never reuses a stale export; the int8 quantisation keys its files by
:func:`backbone_identity` plus its calibration and recipe (:mod:`dn2.runtime.int8`).

Example:
    >>> runtime_cache_dir("openvino").name
    'openvino'
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = ["backbone_identity", "dn2_version", "export_cache_key", "runtime_cache_dir"]


def dn2_version() -> str:
    """dn2's installed version, as ``dn2.__version__`` (read here without importing the package root)."""
    try:
        return importlib.metadata.version("dn2")
    except importlib.metadata.PackageNotFoundError:  # a source tree without installation
        return "0.0.0+unknown"


def backbone_identity(backbone: "Backbone") -> tuple[str, str, int, tuple[int, ...]]:
    """What a converted network depends on: (name, weights id, crop size, stages)."""
    cfg = backbone.config
    return cfg.name, backbone.weights_id, cfg.preprocessing.crop, tuple(getattr(backbone, "stages", ()))


def export_cache_key(backbone: "Backbone", **extra: Any) -> str:
    """A digest of what an exported network depends on: name, weights, crop, stages, dn2 and torch versions.

    The exported files on disk are named by it: changing the fields or their spelling would orphan
    every cached export, so it is kept exactly as it was when runtimes were one module.
    """
    name, weights_id, crop, stages = backbone_identity(backbone)
    key = {
        "name": name,
        "weights_id": weights_id,
        "crop": crop,
        "stages": list(stages),
        "dn2": dn2_version(),
        "torch": torch.__version__,
        **extra,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def runtime_cache_dir(kind: str) -> Path:
    """Where exported networks of one kind live: ``$DN2_CACHE/<kind>`` or ``~/.cache/dn2/<kind>``."""
    root = os.environ.get("DN2_CACHE")
    return Path(root) / kind if root else Path.home() / ".cache" / "dn2" / kind
