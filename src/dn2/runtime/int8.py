"""int8 networks: NNCF post-training quantisation calibrated on the fit images, kept as data.

A backbone becomes an int8 OpenVINO network in three steps, each here once:

1. **Calibration** (:class:`Calibration`): a deterministic sample of the fit images
   (:func:`calibration_indices`: evenly spaced, :func:`calibration_size` of them) as the uint8
   crops the network is fed, with a sha256 of their bytes.
2. **Quantisation** (:func:`quantize`): ``nncf.quantize`` of the fp32 graph with the normalisation
   folded in (uint8 in), following :data:`RECIPE`; the result, an OpenVINO IR, is a
   :class:`QuantizedNetwork` (the .xml and .bin as bytes) cached on disk under a key of backbone
   identity, calibration digest, recipe and versions.
3. **Identity**: the network is what the training embeddings were made with, so a fitted model
   stores it (``QuantizedNetwork.tensors``: uint8 tensors in the model file, covered by its digests)
   and scores through exactly it, also on another machine with an empty cache: :func:`install`
   writes it to the cache under its sha256, :func:`check_network` checks its input and output
   against the backbone. An IR is a graph and weights read by OpenVINO's parser, not code.

Why the recipe is what it is (measured in BENCHMARKS.md, "int8"): quantising every layer moved
embeddings by a quarter of their norm; keeping the high-resolution early layers (output at least
crop/4 pixels high: stem to the first stride-4 stage, the region of the bf16 guard) and the
depthwise convolutions in float brings that to a few percent. ``overflow_fix="enable"`` (7-bit
weights) makes the network compute the same embeddings on CPUs without VNNI, whose u8 x s8 products
go through saturating int16 pairs; without it a model fitted on one kind of CPU would silently score
with a different function on the other.

NNCF is imported only to quantise (the ``int8`` extra); scoring with a stored network needs only
OpenVINO. dn2 turns NNCF's telemetry off and keeps its log and progress output quiet.

Example:
    >>> import numpy as np
    >>> calibration_size(40), calibration_size(1000), calibration_size(10**6)
    (40, 100, 300)
    >>> calibration_indices(10, 4).tolist()
    [0, 3, 6, 9]
    >>> crops = np.zeros((2, 3, 8, 8), np.uint8)
    >>> Calibration.from_crops(crops).digest == Calibration.from_crops(crops.copy()).digest
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from ..outputs import atomic_path
from .exports import backbone_identity, dn2_version, runtime_cache_dir

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = [
    "CALIBRATION_BATCH", "CALIBRATION_FRACTION", "CALIBRATION_MAX", "CALIBRATION_MIN", "INSTALL_HINT", "RECIPE",
    "Calibration", "NNCFMissingError", "QuantizedNetwork", "calibration_indices", "calibration_size", "check_network", "early_ops",
    "install", "int8_cache_dir", "network_digest", "network_info", "nncf_available", "quantize", "quantize_model",
    "require_nncf",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "precision='int8' quantises with NNCF, which is not installed: pip install 'dn2[int8]'"


class NNCFMissingError(ImportError):
    """int8 quantisation was asked for without NNCF installed; the message says how to install it."""

#: How a network is quantised (each field changes the IR, so all are part of the cache key).
RECIPE: dict[str, Any] = {
    "preset": "performance",       # symmetric activations: every activation here follows ReLU6 (non-negative)
    "fast_bias_correction": True,  # without: half the calibration time, embedding error 9% -> 11.5% (BENCHMARKS.md)
    "float_ops": "early+depthwise",  # kept float: outputs >= crop/4 px high, and depthwise (group) convolutions
    "overflow_fix": "enable",      # 7-bit weights: the same embeddings with and without VNNI
    "input": "uint8",              # quantised with the normalisation folded in: fed exactly what dn2 feeds
    "batch": 16,                   # calibration batches; NNCF keeps per-image statistics (batchwise_statistics)
    "target_device": "CPU",
}

# Calibration sample: CALIBRATION_FRACTION of the fit images, at least CALIBRATION_MIN (or all of them) and at
# most CALIBRATION_MAX. 100 images gave the same embedding error as 300 (docs/research/int8.md), and the
# calibration time grows with the sample while the fit's gain from int8 grows with the fit, so a fixed 300
# would weigh most on small fits (BENCHMARKS.md, "int8").
CALIBRATION_MIN, CALIBRATION_MAX, CALIBRATION_FRACTION = 100, 300, 0.1
CALIBRATION_BATCH = RECIPE["batch"]


def calibration_size(n_images: int) -> int:
    """How many of ``n_images`` fit images calibrate the int8 network (see :data:`CALIBRATION_FRACTION`)."""
    wanted = min(CALIBRATION_MAX, max(CALIBRATION_MIN, math.ceil(n_images * CALIBRATION_FRACTION)))
    return min(n_images, wanted)


def calibration_indices(n_images: int, n: int | None = None) -> np.ndarray:
    """``n`` (default :func:`calibration_size`) indices evenly spaced over ``n_images``, first and last
    included, in order: deterministic, so the same fit images give the same network."""
    n = calibration_size(n_images) if n is None else min(n, n_images)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n == n_images:
        return np.arange(n_images, dtype=np.int64)
    return np.unique(np.linspace(0, n_images - 1, n).round().astype(np.int64))


def _crops_digest(crops: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps([list(crops.shape), str(crops.dtype)]).encode())
    h.update(np.ascontiguousarray(crops).reshape(-1).view(np.uint8))
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Calibration:
    """What an int8 network is calibrated on: uint8 crops (N, 3, crop, crop) exactly as the network is fed,
    and the sha256 of their shape, dtype and bytes (which also changes with decoding or resizing)."""

    crops: np.ndarray
    digest: str

    @classmethod
    def from_crops(cls, crops: np.ndarray) -> "Calibration":
        """A calibration of uint8 crops (N >= 1, 3 channels, square); the digest is computed here."""
        crops = np.array(crops, order="C", copy=True)  # frozen below: the caller's array stays theirs
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
            raise ValueError(f"calibration crops must be uint8 (N, 3, S, S), got {crops.dtype} {crops.shape}")
        if len(crops) == 0:
            raise ValueError("calibration needs at least one image")
        crops.setflags(write=False)
        return cls(crops, _crops_digest(crops))

    def __len__(self) -> int:
        return len(self.crops)


def network_digest(xml: bytes, weights: bytes) -> str:
    """sha256 of an IR: its .xml and .bin bytes, each with its length (so no two pairs collide by a shifted cut)."""
    h = hashlib.sha256()
    for part in (xml, weights):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class QuantizedNetwork:
    """An int8 OpenVINO IR as bytes (``xml``, ``weights`` = the .bin), with what made it (``info``: backbone,
    calibration digest and size, recipe, versions) and its :attr:`sha256`, its identity."""

    xml: bytes
    weights: bytes
    info: Mapping[str, Any] = field(default_factory=dict)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", network_digest(self.xml, self.weights))

    def record(self) -> dict[str, Any]:
        """The JSON identity stored in a model file's header: sha256 and how the network was made."""
        return {"sha256": self.sha256, **self.info}

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """The IR as uint8 tensors ``<prefix>xml`` and ``<prefix>bin``, for a model file."""
        return {f"{prefix}xml": np.frombuffer(self.xml, dtype=np.uint8),
                f"{prefix}bin": np.frombuffer(self.weights, dtype=np.uint8)}

    @classmethod
    def from_tensors(cls, record: Any, tensors: Mapping[str, np.ndarray], prefix: str) -> "QuantizedNetwork":
        """The network stored by :meth:`tensors` and :meth:`record`; ``ValueError`` (naming what) unless its bytes
        have the recorded sha256 and the .xml is an OpenVINO IR."""
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError(f"int8 network record {prefix!r} has no sha256")
        arrays = []
        for name in (f"{prefix}xml", f"{prefix}bin"):
            a = tensors.get(name)
            if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 1:
                raise ValueError(f"tensor {name!r} (the int8 network) is missing or not 1-D uint8")
            arrays.append(a.tobytes())
        info = {k: v for k, v in record.items() if k != "sha256"}
        network = cls(arrays[0], arrays[1], info)
        if network.sha256 != record["sha256"]:
            raise ValueError(f"the int8 network {prefix!r} does not match its recorded sha256 (modified?)")
        if not network.xml.lstrip().startswith(b"<?xml") or b"<net " not in network.xml[:4096]:
            raise ValueError(f"the int8 network {prefix!r} is not an OpenVINO IR")
        return network


# ----------------------------------------------------------------------------------------- NNCF


def nncf_available() -> bool:
    """True when NNCF is installed (checked without importing it)."""
    return importlib.util.find_spec("nncf") is not None


def require_nncf() -> None:
    """:class:`NNCFMissingError` saying how to install NNCF, unless it is installed: call before any work."""
    if not nncf_available():
        raise NNCFMissingError(INSTALL_HINT)


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[Any]:
    """NNCF imported and run without telemetry, log lines or progress bars on stdout; yields the module.

    NNCF sends usage telemetry unless it believes it runs in CI (``NNCF_CI``, read once at import, which is
    all that variable does): dn2 works offline and sends nothing. Its logger writes INFO lines to stdout and
    its progress bars go to stdout; dn2 reports the quantisation in its own log instead.
    """
    require_nncf()
    ci_before = os.environ.get("NNCF_CI")
    os.environ.setdefault("NNCF_CI", "1")
    torch_ext = logging.getLogger("torch.utils.cpp_extension")  # warns about CUDA_HOME when NNCF imports it
    torch_ext.addFilter(_drop)  # a filter, not a level: torch's logging setup resets levels
    nncf_log = logging.getLogger("nncf")
    saved = nncf_log.level, [(h, h.level) for h in nncf_log.handlers]
    try:
        import nncf

        if ci_before is None:  # read at import: the process's environment is left as it was
            os.environ.pop("NNCF_CI", None)
        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield nncf
    finally:
        torch_ext.removeFilter(_drop)
        nncf_log.setLevel(saved[0])
        for handler, handler_level in saved[1]:
            handler.setLevel(handler_level)


def _spatial(op: Any) -> int:
    shape = op.get_output_partial_shape(0) if op.get_output_size() else None
    if shape is not None and shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static:
        return shape[2].get_length()
    return 0


def early_ops(model: Any, crop: int) -> list[str]:
    """Names of the ops whose 4-D output is at least ``crop / 4`` pixels high: the stem up to the first
    stride-4 stage (EfficientNet: stem, blocks 0-1; ResNet: conv1 .. layer1), found by shape because
    OpenVINO's conversion renames convolutions fused with their batch norm."""
    skip = {"Parameter", "Constant", "Result", "Convert"}
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() not in skip and _spatial(op) >= crop // 4]


def quantize_model(model: Any, calibration: Calibration, crop: int) -> Any:
    """``nncf.quantize`` of ``model`` (an ov.Model taking the uint8 crops) on ``calibration``, per :data:`RECIPE`:
    the one place NNCF runs (:func:`quantize` adds the cache around it)."""
    with _quiet_nncf() as nncf:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        batch = RECIPE["batch"]
        items = [calibration.crops[i:i + batch] for i in range(0, len(calibration), batch)]
        ignored = nncf.IgnoredScope(names=early_ops(model, crop), types=["GroupConvolution"], validate=False)
        return nncf.quantize(
            model, nncf.Dataset(items),
            preset=nncf.QuantizationPreset(RECIPE["preset"]),
            target_device=nncf.TargetDevice(RECIPE["target_device"]),
            subset_size=len(calibration),
            fast_bias_correction=RECIPE["fast_bias_correction"],
            ignored_scope=ignored,
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix(RECIPE["overflow_fix"]), batchwise_statistics=True),
        )


# ----------------------------------------------------------------------------------------- cache and identity


def int8_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, or ``$DN2_CACHE/openvino-int8`` (``~/.cache/dn2/openvino-int8``)."""
    return Path(cache_dir) if cache_dir else runtime_cache_dir("openvino-int8")


def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _versions() -> dict[str, str]:
    import openvino
    import torch
    from importlib.metadata import version

    return {"nncf": version("nncf"), "openvino": openvino.__version__, "torch": torch.__version__, "dn2": dn2_version()}


def network_info(backbone: "Backbone", calibration: Calibration) -> dict[str, Any]:
    """What a quantisation depends on: backbone identity (+ normalisation), calibration, recipe, versions."""
    return {**_made_for(backbone), "calibration": {"images": len(calibration), "sha256": calibration.digest},
            "recipe": dict(RECIPE), "versions": _versions()}


def _made_for(backbone: "Backbone") -> dict[str, Any]:
    """The backbone an int8 network is made from: identity and the normalisation folded into its graph."""
    name, weights_id, crop, stages = backbone_identity(backbone)
    pre = backbone.config.preprocessing
    return {"backbone": name, "weights_id": weights_id, "crop": crop, "stages": list(stages),
            "mean": list(pre.mean), "std": list(pre.std)}


def _read_verified(xml_path: Path, sha256: str) -> tuple[bytes, bytes] | None:
    """The IR at ``xml_path`` (+ .bin) if both files exist and have ``sha256``; else None."""
    try:
        xml, weights = xml_path.read_bytes(), xml_path.with_suffix(".bin").read_bytes()
    except OSError:
        return None
    return (xml, weights) if network_digest(xml, weights) == sha256 else None


def _write_ir(xml_path: Path, network: QuantizedNetwork) -> None:
    """The .bin, then the .xml, each atomically (a reader checks the pair against a digest anyway)."""
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((xml_path.with_suffix(".bin"), network.weights), (xml_path, network.xml)):
        with atomic_path(path, force=True, what="int8 network cache") as tmp:
            tmp.write_bytes(data)


def quantize(backbone: "Backbone", calibration: Calibration, float_model: Callable[[], Any],
             cache_dir: str | os.PathLike | None = None) -> QuantizedNetwork:
    """The int8 network of ``backbone`` calibrated on ``calibration``: from the disk cache, or quantised.

    ``float_model()`` gives the fp32 ov.Model with uint8 input (normalisation folded in); it is called only
    on a cache miss. The cache entry is ``<name>-<key>.xml/.bin`` with a ``.json`` record holding the IR's
    sha256, written last and checked on every read, so a damaged entry is made again.
    """
    require_nncf()  # the key names NNCF's version: without NNCF no entry can match
    info = network_info(backbone, calibration)
    key = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:32]
    root = int8_cache_dir(cache_dir)
    xml_path = root / f"{_safe(backbone.config.name)}-{key}.xml"
    record_path = xml_path.with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
        cached = _read_verified(xml_path, record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        cached = None
    if cached is not None:
        return QuantizedNetwork(*cached, info)
    import openvino as ov

    start = time.perf_counter()
    quantized = quantize_model(float_model(), calibration, backbone.config.preprocessing.crop)
    with tempfile.TemporaryDirectory(prefix="dn2-int8-") as tmp:
        path = Path(tmp) / "net.xml"
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        network = QuantizedNetwork(path.read_bytes(), path.with_suffix(".bin").read_bytes(), info)
    logger.info("quantised %s to int8 on %d calibration images in %.1f s", backbone.config.name, len(calibration),
                time.perf_counter() - start)
    _write_ir(xml_path, network)
    with atomic_path(record_path, force=True, what="int8 network cache") as tmp:
        tmp.write_text(json.dumps(network.record(), sort_keys=True))
    return network


def install(network: QuantizedNetwork, cache_dir: str | os.PathLike | None = None) -> Path:
    """The .xml path of ``network`` in the cache, ``sha256-<digest>.xml``: written unless an intact copy is there."""
    xml_path = int8_cache_dir(cache_dir) / f"sha256-{network.sha256[:32]}.xml"
    if _read_verified(xml_path, network.sha256) is None:
        _write_ir(xml_path, network)
    return xml_path


def check_network(network: QuantizedNetwork, backbone: "Backbone") -> None:
    """``ValueError`` unless ``network`` takes uint8 (N, 3, crop, crop) and gives float32 (N, feature_dim) for
    ``backbone`` (a network stored for another backbone, crop or ``stages`` is refused before it runs)."""
    import openvino as ov

    try:
        model = ov.Core().read_model(model=network.xml, weights=network.weights)
    except Exception as e:  # noqa: BLE001 - OpenVINO's parser raises RuntimeError subclasses of its own
        raise ValueError(f"the int8 network cannot be read by OpenVINO ({type(e).__name__}: {e})") from None
    crop, dim = backbone.config.preprocessing.crop, backbone.config.feature_dim
    inputs, outputs = model.inputs, model.outputs
    problems = []
    if len(inputs) != 1 or inputs[0].get_element_type() != ov.Type.u8 or \
            inputs[0].get_partial_shape() != ov.PartialShape([-1, 3, crop, crop]):
        problems.append(f"input {[(str(i.get_element_type()), str(i.get_partial_shape())) for i in inputs]}, "
                        f"expected u8 [?,3,{crop},{crop}]")
    if len(outputs) != 1 or outputs[0].get_element_type() != ov.Type.f32 or \
            outputs[0].get_partial_shape() != ov.PartialShape([-1, dim]):
        problems.append(f"output {[(str(o.get_element_type()), str(o.get_partial_shape())) for o in outputs]}, "
                        f"expected f32 [?,{dim}]")
    made_for = _made_for(backbone)
    other = {k: network.info.get(k) for k, v in made_for.items() if network.info.get(k) != v}
    if other:  # e.g. two networks of an ensemble swapped: same shapes, another backbone
        problems.append(f"made for {other}, not {({k: made_for[k] for k in other})}")
    if problems:
        raise ValueError(f"the int8 network does not fit backbone {backbone.config.name}: {'; '.join(problems)}")
