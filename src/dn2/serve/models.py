"""The models a service holds: loaded once at start, each under a short name used in URLs and requests.

A model is named after its file (``parts.dn2`` -> ``parts``) or explicitly (``NAME=PATH``). Names are
short identifiers (letters, digits, ``.``, ``_``, ``-``), so they are safe in a URL and never taken
for a path: a request names a model, the service looks it up in its own table.

Example:
    >>> model_spec("line3=models/parts.dn2"), model_spec("models/parts.dn2")
    (('line3', 'models/parts.dn2'), ('parts', 'models/parts.dn2'))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..detector import DN2, load
from ..review import maps_enabled
from ..runtime import default_batch_size, resolve_runtime

__all__ = ["NAME_PATTERN", "ServedModel", "load_models", "model_spec"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_spec(spec: str) -> tuple[str, str]:
    """``"NAME=PATH"`` or ``"PATH"`` (named after the file's stem) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if sep and not os.path.exists(spec):  # a file whose name holds "=" is still a file
        return name, path
    return Path(spec).stem, spec


@dataclass
class ServedModel:
    """A loaded :class:`~dn2.DN2` model, its name and what clients may know about it."""

    name: str
    model: DN2
    path: Path

    @property
    def batch_size(self) -> int:
        """Images per network run that the model's runtime is fastest with."""
        return self.model.batch_size or default_batch_size(resolve_runtime(self.model.runtime, self.model.method_.precision))

    @property
    def max_side(self) -> int:
        """The largest resize of the model's backbones: JPEGs are decoded at a scale that still covers it."""
        return max(network.config.preprocessing.resize for network in self.model.embedder_.networks_)

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the model (nothing about the machine's paths)."""
        det = self.model.detector
        thumbs = getattr(self.model, "thumbnails_", None)
        return {
            "name": self.name,
            "backbone": self.model.method_.backbone,
            "preset": self.model.preset,
            "normalize": self.model.method_.normalize,
            "k": det.k,
            "threshold": float(det.threshold_),
            "training_size": int(len(det.train_scores_)),
            "memory_size": int(len(det.memory_)),
            "precision": self.model.method_.precision,
            "dn2_version": str(getattr(self.model, "file_info_", {}).get("dn2_version", "unknown")),
            "thumbnails": thumbs is not None,
            "maps": maps_enabled(self.model),
        }


def load_models(specs: Sequence[str], **load_options: Any) -> dict[str, ServedModel]:
    """Load every model once (``load_options`` go to :func:`dn2.load`); names must be unique identifiers."""
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, path = model_spec(spec)
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{path}: model name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                             "starting with a letter or digit; name it with NAME=PATH")
        if name in models:
            raise ValueError(f"{path}: a model named {name!r} is already loaded (from {models[name].path}); "
                             "name one with NAME=PATH")
        model = load(path, **{"progress": False, "num_workers": 0, **load_options})
        if not isinstance(model, DN2):
            raise ValueError(f"{path} holds a detector on embeddings, not an image model")
        models[name] = ServedModel(name, model, Path(path))
    if not models:
        raise ValueError("no model to serve")
    return models
