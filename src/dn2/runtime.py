"""Inference runtimes and precision for feature extraction: OpenVINO, ONNX Runtime or PyTorch; fp32 or bf16.

``runtime="openvino"`` (the default where the ``openvino`` package is installed, which it is with
dn2 on x86-64 and ARM64) converts the backbone once with ``openvino.convert_model`` to an IR file
pair cached on disk (keyed like the ONNX export, weights kept in fp32) and compiles it for the CPU
with the image normalisation folded into the graph, so uint8 crops go in. Measured on a 2-core
AVX-512 BF16 CPU (BENCHMARKS.md), OpenVINO ran EfficientNet-Lite0 4x faster than eager PyTorch in
fp32, and several times faster again in bf16. With ``precision="bf16"`` the network is cut into
pieces (:func:`bf16_parts`): the early high-resolution layers are compiled in fp32, the rest in
bf16 (:data:`BF16_FP32_PARTS`); the CIFAR-10 ROCAUC of this path against fp32 is in BENCHMARKS.md.

``runtime="onnx"`` exports the backbone once with ``torch.onnx.export`` (TorchScript exporter,
dynamic batch axis) to a cache file keyed by backbone name, weights, crop size and dn2 version,
and runs it with ONNX Runtime's CPU provider (graph optimisation ORT_ENABLE_ALL, as many
intra-op threads as torch uses). Measured on a 2-core AVX2 machine, ONNX Runtime ran
EfficientNet-Lite0 about 1.3x and ResNet-101 about 1.25x faster than eager PyTorch fp32 (see
BENCHMARKS.md); the embeddings agree with PyTorch fp32 to about 1e-5 relative. If the export or the
session fails, dn2 warns and uses PyTorch.

With PyTorch, ``precision="bf16"`` runs the network under CPU bf16 autocast, except the same early
layers, which stay in fp32 (:func:`mixed_bf16`): rounding errors made at high resolution are
amplified by every later layer. ``"auto"`` picks bf16 only on CPUs with native bf16 instructions (AVX-512 BF16 or AMX);
elsewhere bf16 is emulated and many times slower than fp32.

Example:
    >>> from dn2.runtime import resolve_runtime
    >>> resolve_runtime("torch", "fp32")
    'torch'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

RUNTIMES = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")

# Images per forward pass when the caller does not choose: eager PyTorch is fastest with small
# batches that stay in the CPU caches (8); ONNX Runtime was measured fastest at 16-32.
DEFAULT_BATCH_SIZE = {"torch": 8, "onnx": 32, "openvino": 16}

# Whether runtime="auto" picks ONNX Runtime (when importable and the precision is fp32). Set from
# benchmarks/extraction.py: end to end from JPEG files, ONNX Runtime was faster for both backbones.
AUTO_PREFERS_ONNX = True


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, runtime: str = "auto") -> str:
    """'auto' -> 'bf16' on CPUs with native bf16 (unless ``runtime`` is 'onnx', fp32 only), else 'fp32'.

    'fp32'/'bf16' are returned as given.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() and runtime != "onnx" else "fp32"
    return precision


def onnx_available() -> bool:
    """True when both onnx (needed by the exporter) and onnxruntime are installed."""
    return importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True when the openvino package is installed."""
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str, precision: str) -> str:
    """'auto' -> 'openvino' when installed (fp32 or bf16); else 'onnx' for fp32 when installed; else 'torch'.

    An explicit 'onnx' needs fp32 (ONNX Runtime has no bf16 CPU path) and raises otherwise.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    precision = resolve_precision(precision, runtime)
    if runtime == "auto":
        if openvino_available():
            return "openvino"
        return "onnx" if AUTO_PREFERS_ONNX and precision == "fp32" and onnx_available() else "torch"
    if runtime == "onnx" and precision != "fp32":
        raise ValueError(f"runtime='onnx' runs fp32 only, got precision={precision!r}")
    return runtime


def default_batch_size(runtime: str) -> int:
    """The measured best batch size of a resolved runtime ('torch', 'onnx' or 'openvino')."""
    return DEFAULT_BATCH_SIZE[runtime]


# ----------------------------------------------------------------------------------------- ONNX


def onnx_cache_dir() -> Path:
    """``$DN2_CACHE/onnx`` or ``~/.cache/dn2/onnx``."""
    root = os.environ.get("DN2_CACHE")
    return Path(root) / "onnx" if root else Path.home() / ".cache" / "dn2" / "onnx"


def onnx_cache_path(backbone: nn.Module, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of a backbone's export: keyed by name, weights, crop, stages and the dn2/torch versions."""
    digest = export_cache_key(backbone)
    safe_name = backbone.config.name.replace(":", "_").replace("/", "_")
    return Path(cache_dir or onnx_cache_dir()) / f"{safe_name}-{digest}.onnx"


def export_onnx(backbone: nn.Module, path: str | os.PathLike) -> Path:
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


class OnnxBackbone:
    """An exported backbone in an ONNX Runtime session; called like the torch module on a batch."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().float().contiguous().numpy())
        (out,) = self.session.run(None, {self.input_name: x})
        return torch.from_numpy(out)


def onnx_backbone(backbone: nn.Module, cache_dir: str | os.PathLike | None = None) -> OnnxBackbone | None:
    """The ONNX Runtime version of ``backbone`` (exported once, cached on disk and on the module).

    Returns None, with a warning, when onnx/onnxruntime are missing or the export or session fails:
    the caller then runs the torch module.
    """
    if not onnx_available():
        warnings.warn("runtime='onnx' needs onnx and onnxruntime (pip install 'dn2[fast]'); using torch", stacklevel=3)
        return None
    path = onnx_cache_path(backbone, cache_dir)
    cached = getattr(backbone, "_dn2_onnx", None)
    if isinstance(cached, OnnxBackbone) and cached.path == path:
        return cached
    try:
        if not path.is_file():
            export_onnx(backbone, path)
        runner = OnnxBackbone(path)
    except Exception as e:  # noqa: BLE001 - any export/session failure means: use torch
        warnings.warn(f"ONNX export or session for {backbone.config.name} failed ({type(e).__name__}: {e}); "
                      "using torch", stacklevel=3)
        return None
    object.__setattr__(backbone, "_dn2_onnx", runner)  # plain attribute, not a submodule
    return runner


# ----------------------------------------------------------------------------------------- OpenVINO


def export_cache_key(backbone: nn.Module, **extra: Any) -> str:
    """A digest of what an exported network depends on: name, weights, crop, stages, dn2 and torch versions."""
    from . import __version__

    cfg = backbone.config
    key = {
        "name": cfg.name,
        "weights_id": backbone.weights_id,
        "crop": cfg.preprocessing.crop,
        "stages": list(getattr(backbone, "stages", ())),
        "dn2": __version__,
        "torch": torch.__version__,
        **extra,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def openvino_cache_path(backbone: nn.Module, cache_dir: str | os.PathLike | None = None, part: str = "",
                        piece: Any = None) -> Path:
    """``<cache>/openvino/<name>-<digest>[-<part>].xml`` (with its ``.bin``), keyed like the ONNX export plus
    the OpenVINO version and, for a piece of a split network (:func:`bf16_parts`), which piece
    (``piece``: anything that identifies its layers, e.g. :func:`_layer_shapes`)."""
    import openvino as ov

    root = Path(cache_dir) if cache_dir else onnx_cache_dir().parent / "openvino"
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


# Which pieces of a split network (:func:`bf16_parts`) run in fp32 when precision="bf16", in both runtimes.
# Measured on CIFAR-10 with EfficientNet-Lite0 (BENCHMARKS.md): bf16 everywhere cost 0.28 ROCAUC points
# (raw features); keeping only the stem conv and the head in fp32 still 0.24. The error is made early: the
# high-resolution layers' rounding is amplified by all later ones (median embedding error 7% -> 2% with
# the first two EfficientNet stages in fp32; later stages in fp32 changed nothing). The head in fp32 as
# well (the first guard) changed neither the embedding error (0.0205 vs 0.0206) nor the ROCAUC (Lite0
# -0.220 vs -0.222 raw, -0.058 vs -0.057 sqrt_l2) and cost ResNet-101 6% of its speed: early only.
BF16_FP32_PARTS: tuple[str, ...] = ("early",)


def bf16_parts(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]] | None:
    """The backbone's layers as named pieces early -> middle -> head, whose composition is its forward.

    early: the stem and the layers up to and including the first stage at stride 4 (EfficientNet:
    conv_stem, bn1, blocks 0-1; ResNet: conv1, bn1, relu, maxpool, layer1); head: the last
    convolution block and the global pooling (EfficientNet: conv_head, bn2, pooling; ResNet: the last
    block of layer4, pooling); middle: the rest. None for networks of another structure or with extra
    ``stages`` (hooks), which then run in bf16 with only :func:`fp32_modules`' structural guard.
    """
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


def openvino_pieces(backbone: nn.Module, precision: str) -> list[tuple[str, nn.Module, str]]:
    """(part name, module, precision) to convert and chain: the whole network, or for bf16 the pieces of
    :func:`bf16_parts` with those in :data:`BF16_FP32_PARTS` in fp32 (neighbours of equal precision merged)."""
    parts = bf16_parts(backbone) if precision == "bf16" else None
    if parts is None:
        if precision == "bf16" and getattr(backbone, "stages", ()):
            warnings.warn("OpenVINO bf16 cannot keep the early layers in fp32 with stages=; running fp32",
                          stacklevel=4)
            precision = "fp32"
        return [("", backbone, precision)]
    pieces: list[tuple[list[str], list[nn.Module], str]] = []
    for name, modules in parts:
        p = "fp32" if name in BF16_FP32_PARTS else "bf16"
        if pieces and pieces[-1][2] == p:
            pieces[-1][0].append(name)
            pieces[-1][1].extend(modules)
        else:
            pieces.append(([name], list(modules), p))
    if len(pieces) == 1:
        return [("", backbone, pieces[0][2])]
    pieces[-1][1].append(nn.Flatten(1))  # ResNets flatten after pooling in forward; a no-op for timm's pooling
    return [("+".join(names), nn.Sequential(*mods), p) for names, mods, p in pieces]


class OpenVinoBackbone:
    """A converted backbone compiled by OpenVINO for the CPU; called on a uint8 (N, 3, H, W) batch of crops.

    It may be a chain of compiled pieces of different precision (see :func:`openvino_pieces`). The
    backbone's mean/std normalisation runs inside the first compiled graph (``uint8_input = True``
    tells :func:`dn2.features.extract` to pass the crops as they are).
    """

    uint8_input = True

    def __init__(self, pieces: list[tuple[Path, str]], mean: tuple[float, ...], std: tuple[float, ...],
                 num_threads: int | None = None):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = ov.Core()
        self.paths = [Path(path) for path, _ in pieces]
        self.precisions = [precision for _, precision in pieces]
        self.requests = []
        for i, (path, precision) in enumerate(pieces):
            model = core.read_model(str(path))
            if i == 0:
                ppp = PrePostProcessor(model)
                ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
                ppp.input().model().set_layout(ov.Layout("NCHW"))
                ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([m * 255.0 for m in mean]).scale(
                    [s * 255.0 for s in std])
                model = ppp.build()
            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": int(num_threads or torch.get_num_threads()),
            }
            self.requests.append(core.compile_model(model, "CPU", config).create_infer_request())

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().to(torch.uint8).contiguous().numpy())
        for request in self.requests:  # each output is read by the next piece before it runs again
            x = request.infer({0: x}, share_inputs=True)[0]
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))  # the request reuses its buffer


def openvino_backbone(backbone: nn.Module, precision: str = "fp32",
                      cache_dir: str | os.PathLike | None = None) -> OpenVinoBackbone | None:
    """The OpenVINO version of ``backbone`` at ``precision`` (converted once, cached on disk and on the module).

    Returns None, with a warning, when openvino is missing or the conversion or compilation fails:
    the caller then runs the torch module.
    """
    if not openvino_available():
        warnings.warn("runtime='openvino' needs the openvino package (pip install openvino); using torch", stacklevel=3)
        return None
    try:
        pieces = openvino_pieces(backbone, precision)
        paths = [openvino_cache_path(backbone, cache_dir, part, piece=_layer_shapes(module) if part else None)
                 for part, module, _ in pieces]
        cached = getattr(backbone, "_dn2_openvino", None)
        if isinstance(cached, OpenVinoBackbone) and cached.paths == paths and cached.precisions == [p for *_, p in pieces]:
            return cached
        missing = [not (path.is_file() and path.with_suffix(".bin").is_file()) for path in paths]
        crop = backbone.config.preprocessing.crop
        example = torch.zeros(2, 3, crop, crop)  # each piece's example input is the previous piece's output
        for i, (path, (_, module, _)) in enumerate(zip(paths, pieces)):
            if missing[i]:
                export_openvino(module, path, example)
            if any(missing[i + 1:]):
                with torch.no_grad():
                    example = module(example)
        pre = backbone.config.preprocessing
        runner = OpenVinoBackbone([(path, p) for path, (*_, p) in zip(paths, pieces)], pre.mean, pre.std)
    except Exception as e:  # noqa: BLE001 - any conversion/compile failure means: use torch
        warnings.warn(f"OpenVINO conversion or compilation for {backbone.config.name} failed "
                      f"({type(e).__name__}: {e}); using torch", stacklevel=3)
        return None
    object.__setattr__(backbone, "_dn2_openvino", runner)  # plain attribute, not a submodule
    return runner


# ----------------------------------------------------------------------------------------- bf16


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


def _fp32_forward(forward: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast("cpu", enabled=False):
            return forward(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def mixed_bf16(backbone: nn.Module, enabled: bool = True) -> Iterator[list[nn.Module]]:
    """bf16 autocast for ``backbone`` with the accuracy-critical layers of :func:`fp32_modules` in fp32.

    Inside the block the kept modules run with autocast disabled on fp32 inputs (their forward is
    wrapped; the wrappers are removed on exit). Yields the kept modules. ``enabled=False`` is a no-op.
    """
    if not enabled:
        yield []
        return
    keep = fp32_modules(backbone)
    for m in keep:
        m.forward = _fp32_forward(m.forward)  # instance attribute shadows the class method
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield keep
    finally:
        for m in keep:
            del m.forward


__all__ = [
    "RUNTIMES",
    "PRECISIONS",
    "DEFAULT_BATCH_SIZE",
    "OnnxBackbone",
    "OpenVinoBackbone",
    "cpu_supports_bf16",
    "default_batch_size",
    "export_onnx",
    "export_openvino",
    "export_cache_key",
    "fp32_modules",
    "mixed_bf16",
    "onnx_available",
    "onnx_backbone",
    "onnx_cache_dir",
    "onnx_cache_path",
    "openvino_available",
    "openvino_backbone",
    "openvino_cache_path",
    "openvino_pieces",
    "bf16_parts",
    "BF16_FP32_PARTS",
    "resolve_precision",
    "resolve_runtime",
]
