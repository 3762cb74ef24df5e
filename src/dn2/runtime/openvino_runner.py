"""OpenVINO: the backbone converted once to an IR cached on disk, compiled for the CPU, uint8 crops in.

``openvino.convert_model`` converts the backbone (weights kept in fp32) to an IR file pair keyed
like the ONNX export plus the OpenVINO version; it is compiled with the image normalisation folded
into the graph, so the uint8 crops go in as they are. Measured on a 2-core AVX-512 BF16 CPU
(BENCHMARKS.md), OpenVINO ran EfficientNet-Lite0 4x faster than eager PyTorch in fp32, and several
times faster again in bf16. For bf16 the network is cut into pieces (:func:`openvino_pieces`): the
early high-resolution layers are compiled in fp32, the rest in bf16. For int8 the runner compiles a
quantised network (:mod:`dn2.runtime.int8`): made from the fp32 IR with uint8 input
(:func:`uint8_model`) and calibration images (:func:`quantize_int8`), or given as it was stored.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> runner = OpenVinoRunner.build(load_backbone("efficientnet_lite0"), "fp32")  # doctest: +SKIP
    >>> runner(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape  # doctest: +SKIP
    torch.Size([2, 1280])
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np
import torch
from torch import nn

from . import int8
from .bf16 import bf16_parts, fp32_parts
from .base import Runner
from .exports import export_cache_key, runtime_cache_dir
from .int8 import Calibration, QuantizedNetwork

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = [
    "OpenVinoRunner", "export_openvino", "openvino_available", "openvino_cache_path", "openvino_pieces", "quantize_int8",
    "uint8_model", "with_uint8_input",
]


def openvino_available() -> bool:
    """True when the openvino package is installed."""
    return importlib.util.find_spec("openvino") is not None


def openvino_cache_path(backbone: "Backbone", cache_dir: str | os.PathLike | None = None, part: str = "",
                        piece: Any = None) -> Path:
    """``<cache>/openvino/<name>-<digest>[-<part>].xml`` (with its ``.bin``), keyed like the ONNX export plus
    the OpenVINO version and, for a piece of a split network (:func:`openvino_pieces`), which piece
    (``piece``: anything that identifies its layers, e.g. a digest of their shapes)."""
    import openvino as ov

    root = Path(cache_dir) if cache_dir else runtime_cache_dir("openvino")
    safe_name = backbone.config.name.replace(":", "_").replace("/", "_")
    digest = export_cache_key(backbone, openvino=ov.__version__, part=part, piece=piece)
    return root / f"{safe_name}-{digest}{'-' + part if part else ''}.xml"


def _layer_shapes(module: nn.Module) -> str:
    """A digest of a piece's parameter and buffer names and shapes: which layers it holds, without running it."""
    shapes = [[name, list(t.shape)] for name, t in module.state_dict().items()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def export_openvino(module: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> Path:
    """Convert ``module`` to an OpenVINO IR (fp32 weights, dynamic batch) at ``path`` (.xml + .bin), atomically.

    ``example`` is an input batch of the right shape (its batch size is made dynamic).
    """
    import openvino as ov

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            model = ov.convert_model(module, example_input=example, input=[(-1, *example.shape[1:])])
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # the default would round weights to fp16
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return path


def openvino_pieces(backbone: "Backbone", precision: str) -> list[tuple[str, nn.Module, str]]:
    """(part name, module, precision) to convert and chain: the whole network, or for bf16 the pieces of
    :func:`~dn2.runtime.bf16.bf16_parts` with those in :data:`~dn2.runtime.bf16.BF16_FP32_PARTS` in fp32
    (neighbours of equal precision merged)."""
    parts = bf16_parts(backbone) if precision == "bf16" else None
    if parts is None:
        if precision == "bf16" and getattr(backbone, "stages", ()):
            warnings.warn("OpenVINO bf16 cannot keep the early layers in fp32 with stages=; running fp32",
                          stacklevel=5)  # openvino_pieces <- build <- get_runner <- extract <- its caller
            precision = "fp32"
        return [("", backbone, precision)]
    keep = fp32_parts()
    pieces: list[tuple[list[str], list[nn.Module], str]] = []
    for name, modules in parts:
        p = "fp32" if name in keep else "bf16"
        if pieces and pieces[-1][2] == p:
            pieces[-1][0].append(name)
            pieces[-1][1].extend(modules)
        else:
            pieces.append(([name], list(modules), p))
    if len(pieces) == 1:
        return [("", backbone, pieces[0][2])]
    pieces[-1][1].append(nn.Flatten(1))  # ResNets flatten after pooling in forward; a no-op for timm's pooling
    return [("+".join(names), nn.Sequential(*mods), p) for names, mods, p in pieces]


def with_uint8_input(model: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """``model`` (an ov.Model on normalised float NCHW input) taking uint8 crops: the conversion and
    ``(x - mean) / std`` folded into the graph. Changes ``model`` in place and returns it."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([m * 255.0 for m in mean]).scale(
        [s * 255.0 for s in std])
    return ppp.build()


def uint8_model(backbone: "Backbone", cache_dir: str | os.PathLike | None = None) -> Any:
    """The whole backbone as one fp32 ov.Model with uint8 input (its cached IR, exported if missing)."""
    import openvino as ov

    path = openvino_cache_path(backbone, cache_dir)
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        crop = backbone.config.preprocessing.crop
        export_openvino(backbone, path, torch.zeros(2, 3, crop, crop))
    pre = backbone.config.preprocessing
    return with_uint8_input(ov.Core().read_model(str(path)), pre.mean, pre.std)


def quantize_int8(backbone: "Backbone", calibration: Calibration,
                  cache_dir: str | os.PathLike | None = None) -> QuantizedNetwork:
    """The int8 network of ``backbone`` calibrated on ``calibration`` (:func:`dn2.runtime.int8.quantize`:
    cached on disk, quantised from :func:`uint8_model` on a miss); ``cache_dir`` is the fp32 IR's folder."""
    return int8.quantize(backbone, calibration, lambda: uint8_model(backbone, cache_dir))


class OpenVinoRunner(Runner):
    """A converted backbone compiled by OpenVINO for the CPU; called on a uint8 (N, 3, H, W) batch of crops.

    It may be a chain of compiled pieces of different precision (see :func:`openvino_pieces`). The
    backbone's mean/std normalisation runs inside the first compiled graph. An int8 runner runs one
    quantised network (``network``, a :class:`~dn2.runtime.int8.QuantizedNetwork`), whose graph
    already takes uint8 crops; its float operations run in fp32.
    """

    name = "openvino"
    precisions = frozenset({"fp32", "bf16", "int8"})
    default_batch_size = 16
    uint8_input = True
    requirement = "the openvino package (pip install openvino)"

    def __init__(self, pieces: list[tuple[Path | None, str]], mean: tuple[float, ...], std: tuple[float, ...],
                 precision: str = "fp32", num_threads: int | None = None, network: QuantizedNetwork | None = None):
        import openvino as ov

        core = ov.Core()
        self.precision = precision
        self.network = network
        self.paths = [None if path is None else Path(path) for path, _ in pieces]
        self.piece_precisions = [p for _, p in pieces]
        self.requests = []
        for i, (path, piece_precision) in enumerate(pieces):
            if path is None:  # the int8 network, read from memory (its bytes were verified on load)
                model = core.read_model(model=network.xml, weights=network.weights)
            else:
                model = core.read_model(str(path))
            if i == 0 and piece_precision != "int8":  # a quantised network was made with the uint8 input in it
                model = with_uint8_input(model, mean, std)
            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if piece_precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": int(num_threads or torch.get_num_threads()),
            }
            self.requests.append(core.compile_model(model, "CPU", config).create_infer_request())

    @classmethod
    def available(cls) -> bool:
        return openvino_available()

    @classmethod
    def build(cls, backbone: "Backbone", precision: str = "fp32", cache_dir: str | os.PathLike | None = None, *,
              calibration: Calibration | None = None, network: QuantizedNetwork | None = None) -> "OpenVinoRunner":
        """Convert the pieces of ``backbone`` not yet in the cache, then compile them all.

        int8: compile ``network``, or the network quantised on ``calibration`` (:func:`quantize_int8`).
        """
        if precision not in cls.precisions:
            raise ValueError(f"OpenVINO runs {sorted(cls.precisions)}, not {precision!r}")
        pre = backbone.config.preprocessing
        if precision == "int8":
            if network is None:
                if calibration is None:
                    raise ValueError("an int8 runner needs calibration images or a quantised network")
                network = quantize_int8(backbone, calibration, cache_dir)
            try:
                xml_path: Path | None = int8.install(network)
            except OSError:  # a read-only cache (a container, a shared home): compile it from memory
                xml_path = None
            return cls([(xml_path, "int8")], pre.mean, pre.std, precision, network=network)
        pieces = openvino_pieces(backbone, precision)
        paths = [openvino_cache_path(backbone, cache_dir, part, piece=_layer_shapes(module) if part else None)
                 for part, module, _ in pieces]
        missing = [not (path.is_file() and path.with_suffix(".bin").is_file()) for path in paths]
        crop = pre.crop
        example = torch.zeros(2, 3, crop, crop)  # each piece's example input is the previous piece's output
        for i, (path, (_, module, _)) in enumerate(zip(paths, pieces)):
            if missing[i]:
                export_openvino(module, path, example)
            if any(missing[i + 1:]):
                with torch.no_grad():
                    example = module(example)
        return cls([(path, p) for path, (*_, p) in zip(paths, pieces)], pre.mean, pre.std, precision)

    @classmethod
    def cache_key(cls, backbone: "Backbone", precision: str, *, calibration: Calibration | None = None,
                  network: QuantizedNetwork | None = None) -> Hashable:
        key = super().cache_key(backbone, precision, calibration=calibration, network=network)
        return (*key, str(runtime_cache_dir("openvino")), str(int8.int8_cache_dir()))  # type: ignore[misc]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to(torch.uint8).contiguous().numpy())
        for request in self.requests:  # each output is read by the next piece before it runs again
            x = request.infer({0: x}, share_inputs=True)[0]
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))  # the request reuses its buffer
