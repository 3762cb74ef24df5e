"""ONNX Runtime (fp32): the backbone exported once with ``torch.onnx.export``, run by ORT's CPU provider.

The export (TorchScript exporter, dynamic batch axis) is cached on disk, keyed by backbone name,
weights, crop size, stages and the dn2/torch versions. Measured on a 2-core AVX2 machine, ONNX
Runtime ran EfficientNet-Lite0 about 1.3x and ResNet-101 about 1.25x faster than eager PyTorch fp32
(BENCHMARKS.md); embeddings agree with PyTorch fp32 to about 1e-5 relative. ORT has no bf16 CPU path.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> runner = OnnxRunner.build(load_backbone("efficientnet_lite0"), "fp32")  # doctest: +SKIP
    >>> runner(torch.zeros(2, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([2, 1280])
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np
import torch

from .base import Runner
from .exports import export_cache_key, runtime_cache_dir

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = ["OnnxRunner", "export_onnx", "onnx_available", "onnx_cache_dir", "onnx_cache_path"]


def onnx_available() -> bool:
    """True when both onnx (needed by the exporter) and onnxruntime are installed."""
    return importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None


def onnx_cache_dir() -> Path:
    """``$DN2_CACHE/onnx`` or ``~/.cache/dn2/onnx``."""
    return runtime_cache_dir("onnx")


def onnx_cache_path(backbone: "Backbone", cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of a backbone's export: keyed by name, weights, crop, stages and the dn2/torch versions."""
    digest = export_cache_key(backbone)
    safe_name = backbone.config.name.replace(":", "_").replace("/", "_")
    return Path(cache_dir or onnx_cache_dir()) / f"{safe_name}-{digest}.onnx"


def export_onnx(backbone: "Backbone", path: str | os.PathLike) -> Path:
    """Export ``backbone`` (fp32, channels-first input, dynamic batch) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    crop = backbone.config.preprocessing.crop
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    dummy = torch.zeros(2, 3, crop, crop)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            torch.onnx.export(
                backbone,
                (dummy,),
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OnnxRunner(Runner):
    """An exported backbone in an ONNX Runtime session (graph optimisation ORT_ENABLE_ALL, as many
    intra-op threads as torch uses); takes normalised float32 NCHW batches."""

    name = "onnx"
    precisions = frozenset({"fp32"})
    default_batch_size = 32  # measured fastest at 16-32
    requirement = "onnx and onnxruntime (pip install 'dn2[fast]')"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.precision = "fp32"
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def available(cls) -> bool:
        return onnx_available()

    @classmethod
    def build(cls, backbone: "Backbone", precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
              **int8: Any) -> "OnnxRunner":
        """Export ``backbone`` unless its export is cached, and open a session on the file (fp32 only: no
        ``calibration``/``network``)."""
        if precision not in cls.precisions:
            raise ValueError(f"ONNX Runtime runs fp32 only, not {precision!r}")
        path = onnx_cache_path(backbone, cache_dir)
        if not path.is_file():
            export_onnx(backbone, path)
        return cls(path)

    @classmethod
    def cache_key(cls, backbone: "Backbone", precision: str, **int8: Any) -> Hashable:
        return (*super().cache_key(backbone, precision), str(onnx_cache_dir()))  # type: ignore[misc]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().float().contiguous().numpy())
        (out,) = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(out)
