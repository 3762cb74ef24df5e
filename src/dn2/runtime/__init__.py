"""How the network runs: one :class:`Runner` interface over OpenVINO, ONNX Runtime and eager PyTorch.

:func:`get_runner` turns a backbone, a runtime and a precision (each may be ``"auto"``) into a
runner: called on a batch of crops, it returns (N, D) float32 embeddings. Runners are built once
and kept in a small in-process cache (:data:`RUNNER_CACHE_SIZE` entries, least recently used
dropped first); converted networks are also cached on disk (``$DN2_CACHE`` or ``~/.cache/dn2``).

- ``openvino`` (:mod:`~dn2.runtime.openvino_runner`; the default where installed, which it is with
  dn2 on x86-64 and ARM64): fp32, bf16 or int8, normalisation inside the graph, uint8 crops in.
- ``onnx`` (:mod:`~dn2.runtime.onnx_runner`; the ``fast`` extra): fp32 only.
- ``torch`` (:mod:`~dn2.runtime.torch_runner`): always there; fp32, or bf16 autocast.

With bf16 both OpenVINO and PyTorch keep the early high-resolution layers in fp32
(:data:`~dn2.runtime.bf16.BF16_FP32_PARTS`, see :mod:`~dn2.runtime.bf16`). ``precision="auto"``
picks the first of :data:`~dn2.runtime.base.AUTO_PRECISION_ORDER` that the runtime can run and
this CPU runs natively (:mod:`~dn2.runtime.cpu`): bf16 only with AVX-512 BF16 or AMX, elsewhere
bf16 is emulated and many times slower than fp32. When a conversion fails, or the runtime's package
is missing, :func:`get_runner` warns and returns the PyTorch runner.

int8 (:mod:`~dn2.runtime.int8`, OpenVINO only, never chosen by "auto") is quantised on calibration
images: :func:`get_runner` takes them (``calibration=``, a :class:`~dn2.runtime.int8.Calibration`),
or the quantised network they made (``network=``, as stored in a model file); there is no fallback.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> from dn2.runtime import get_runner, resolve_runtime
    >>> resolve_runtime("torch", "fp32")
    'torch'
    >>> runner = get_runner(load_backbone("efficientnet_lite0"), "torch", "fp32")
    >>> runner.name, runner.uint8_input, runner.default_batch_size
    ('torch', False, 8)
    >>> runner(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 1280])
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable

from . import bf16, cpu, int8
from .base import AUTO_PRECISION_ORDER, PRECISION_TABLE, Precision, Runner
from .exports import export_cache_key
from .bf16 import bf16_parts, fp32_modules, mixed_bf16
from .cpu import CpuFeatures, cpu_features, cpu_supports_bf16
from .int8 import Calibration, QuantizedNetwork
from .onnx_runner import OnnxRunner, export_onnx, onnx_available, onnx_cache_dir, onnx_cache_path
from .openvino_runner import (
    OpenVinoRunner,
    export_openvino,
    openvino_available,
    openvino_cache_path,
    openvino_pieces,
    quantize_int8,
)
from .torch_runner import TorchRunner

if TYPE_CHECKING:
    from ..backbones import Backbone

# Every runtime by name. A new runtime is a Runner subclass added here (and to AUTO_RUNTIME_ORDER
# if "auto" may choose it); a new precision is an entry of base.PRECISION_TABLE named in the
# ``precisions`` of the runners that run it.
RUNNERS: dict[str, type[Runner]] = {"torch": TorchRunner, "onnx": OnnxRunner, "openvino": OpenVinoRunner}
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx", "openvino")
PRECISIONS: tuple[str, ...] = ("auto", *PRECISION_TABLE)

# What runtime="auto" tries, first installed one that runs the precision wins: OpenVINO was fastest
# for both backbones in fp32 and bf16, then ONNX Runtime (fp32), then eager PyTorch (BENCHMARKS.md).
AUTO_RUNTIME_ORDER: tuple[str, ...] = ("openvino", "onnx", "torch")

# Whether runtime="auto" picks ONNX Runtime (when importable and the precision is fp32). Set from
# benchmarks/extraction.py: end to end from JPEG files, ONNX Runtime was faster for both backbones.
AUTO_PREFERS_ONNX = True

# Images per forward pass when the caller does not choose, per runtime (each Runner declares its own).
DEFAULT_BATCH_SIZE: dict[str, int] = {name: cls.default_batch_size for name, cls in RUNNERS.items()}

# Compiled networks kept in the process: enough for an ensemble at two precisions, few enough that a
# long-lived process sweeping backbones does not accumulate them (a ResNet-101 runner holds ~170 MB).
RUNNER_CACHE_SIZE = 4

_cache: OrderedDict[Hashable, Runner] = OrderedDict()
_cache_lock = threading.Lock()


def runtimes_for(precision: str) -> list[str]:
    """The runtimes whose runner can run ``precision`` (installed or not), e.g. ``['torch', 'openvino']`` for bf16."""
    return [name for name, cls in RUNNERS.items() if precision in cls.precisions]


def resolve_precision(precision: str, runtime: str = "auto") -> str:
    """``"auto"`` -> the first precision of :data:`AUTO_PRECISION_ORDER` that ``runtime`` runs and the CPU
    runs natively (bf16 on AVX-512 BF16/AMX CPUs unless ``runtime`` is 'onnx', else fp32).

    Other precisions are returned as given.

    Example:
        >>> resolve_precision("fp32"), resolve_precision("auto", "onnx")
        ('fp32', 'fp32')
    """
    if precision != "auto" and precision not in PRECISION_TABLE:  # the table, not PRECISIONS: read at call time
        raise ValueError(f"precision must be one of {('auto', *PRECISION_TABLE)}, got {precision!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if precision != "auto":
        return precision
    if runtime == "auto":
        runnable = {p for cls in RUNNERS.values() if cls.available() for p in cls.precisions}
    else:
        runnable = set(RUNNERS[runtime].precisions)
    features = cpu.cpu_features()
    for name in AUTO_PRECISION_ORDER:
        if name in runnable and PRECISION_TABLE[name].is_native(features):
            return name
    return "fp32"


def resolve_runtime(runtime: str, precision: str) -> str:
    """``"auto"`` -> the first installed runtime of :data:`AUTO_RUNTIME_ORDER` that runs the precision
    ('openvino' when installed; else 'onnx' for fp32 when installed; else 'torch').

    An explicit runtime must run the precision: ``resolve_runtime("onnx", "bf16")`` raises ``ValueError``.

    Example:
        >>> resolve_runtime("torch", "bf16")
        'torch'
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    precision = resolve_precision(precision, runtime)
    if runtime == "auto":
        for name in AUTO_RUNTIME_ORDER:
            cls = RUNNERS[name]
            if name == "onnx" and not AUTO_PREFERS_ONNX:
                continue
            if precision in cls.precisions and cls.available():
                return name
        raise ValueError(f"no installed runtime runs precision={precision!r} (one of {runtimes_for(precision)} would)")
    supported = RUNNERS[runtime].precisions
    if precision not in supported:
        raise ValueError(f"runtime={runtime!r} runs {', '.join(sorted(supported))} only, got precision={precision!r}")
    return runtime


def default_batch_size(runtime: str) -> int:
    """The measured best batch size of a resolved runtime ('torch', 'onnx' or 'openvino')."""
    return RUNNERS[runtime].default_batch_size


def get_runner(backbone: "Backbone", runtime: str = "auto", precision: str = "auto", *,
               calibration: Calibration | None = None, network: QuantizedNetwork | None = None) -> Runner:
    """The runner of ``backbone`` for ``runtime`` and ``precision`` (both resolved first), built once.

    The same backbone identity, runtime and precision (with bf16's fp32 pieces and the export folder)
    give the same runner object until it drops out of the cache. When the runtime is not installed
    or its conversion fails, warns and returns the PyTorch runner at the same precision.

    A calibrated precision (int8) needs exactly one of ``calibration`` (images to quantise on: the
    network is made, or read from the disk cache, keyed by their digest) and ``network`` (a network
    made before, e.g. stored in a model file); it is an error for the others. An int8 runner that
    cannot be built raises: no other runtime runs int8.

    Example:
        >>> from dn2.backbones import load_backbone
        >>> net = load_backbone("efficientnet_lite0")
        >>> get_runner(net, "torch", "fp32") is get_runner(net, "torch", "fp32")
        True
    """
    precision = resolve_precision(precision, runtime)
    calibrated = PRECISION_TABLE[precision].calibrated
    if calibrated and (calibration is None) == (network is None):
        raise ValueError(f"precision={precision!r} needs either calibration images or a quantised network "
                         "(DN2 and Embedder calibrate on the images they are fitted on)")
    if not calibrated and (calibration is not None or network is not None):
        raise ValueError(f"calibration and network apply to precision='int8' only, not {precision!r}")
    runtime = resolve_runtime(runtime, precision)
    cls = RUNNERS[runtime]
    if not cls.available():
        if calibrated:
            raise ValueError(f"precision={precision!r} runs on {runtimes_for(precision)} only; "
                             f"runtime={runtime!r} needs {cls.requirement}")
        warnings.warn(f"runtime={runtime!r} needs {cls.requirement}; using torch", stacklevel=2)
        return get_runner(backbone, "torch", precision)
    int8_source = {"calibration": calibration, "network": network} if calibrated else {}
    key = cls.cache_key(backbone, precision, **int8_source)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        runner = cls.build(backbone, precision, **int8_source)
    except Exception as e:  # noqa: BLE001 - any conversion/compilation failure means: use torch
        if cls is TorchRunner or calibrated:
            raise
        warnings.warn(f"{runtime} conversion or compilation for {backbone.config.name} failed "
                      f"({type(e).__name__}: {e}); using torch", stacklevel=2)
        return get_runner(backbone, "torch", precision)
    with _cache_lock:
        _cache[key] = runner
        while len(_cache) > RUNNER_CACHE_SIZE:
            _cache.popitem(last=False)  # least recently used: its compiled network is freed with it
    return runner


def clear_runner_cache() -> None:
    """Forget every cached runner (their compiled networks are freed once nothing else holds them)."""
    with _cache_lock:
        _cache.clear()


class _RuntimeModule(types.ModuleType):
    """``dn2.runtime.BF16_FP32_PARTS`` reads and rebinds :data:`dn2.runtime.bf16.BF16_FP32_PARTS`.

    One setting under two names (the second is where it always was): a plain re-export would be a
    copy, and an experiment rebinding one name would silently leave the runners using the other.
    """

    @property
    def BF16_FP32_PARTS(self) -> tuple[str, ...]:  # noqa: N802 - a module constant's name
        return bf16.BF16_FP32_PARTS

    @BF16_FP32_PARTS.setter
    def BF16_FP32_PARTS(self, parts: tuple[str, ...]) -> None:  # noqa: N802
        bf16.BF16_FP32_PARTS = tuple(parts)


sys.modules[__name__].__class__ = _RuntimeModule

__all__ = [
    "AUTO_PREFERS_ONNX",
    "AUTO_PRECISION_ORDER",
    "AUTO_RUNTIME_ORDER",
    "BF16_FP32_PARTS",
    "Calibration",
    "CpuFeatures",
    "DEFAULT_BATCH_SIZE",
    "OnnxRunner",
    "OpenVinoRunner",
    "PRECISIONS",
    "PRECISION_TABLE",
    "Precision",
    "QuantizedNetwork",
    "RUNNERS",
    "RUNNER_CACHE_SIZE",
    "RUNTIMES",
    "Runner",
    "TorchRunner",
    "bf16_parts",
    "clear_runner_cache",
    "cpu_features",
    "cpu_supports_bf16",
    "default_batch_size",
    "export_cache_key",
    "export_onnx",
    "export_openvino",
    "fp32_modules",
    "get_runner",
    "int8",
    "mixed_bf16",
    "onnx_available",
    "onnx_cache_dir",
    "onnx_cache_path",
    "openvino_available",
    "openvino_cache_path",
    "openvino_pieces",
    "quantize_int8",
    "resolve_precision",
    "resolve_runtime",
    "runtimes_for",
]
