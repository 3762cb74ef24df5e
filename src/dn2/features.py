"""Feature extraction: images in, one embedding per image out, streamed in batches.

Decoding and resizing run in DataLoader worker processes (:class:`CropDataset`) and hand uint8
crops to the main process, which gives them to the backbone's runner (:func:`dn2.runtime.get_runner`):
as they are when the runner normalises inside its graph, normalised otherwise. Memory stays
bounded: only a few batches of decoded images exist at any time. The backbone module passed in is
not changed. Bad images are reported with ``warnings``; the summary goes to the ``dn2.features``
logger (the application decides what to show).

With ``precision="int8"`` the network is quantised on a sample of the images an :class:`Embedder`
is fitted on (:func:`calibrate`, :mod:`dn2.runtime.int8`), and the embedder keeps that network
(``int8_networks_``): everything it embeds afterwards goes through exactly it.

Example:
    >>> import numpy as np
    >>> from dn2 import Embedder
    >>> images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    >>> Embedder(progress=False).transform(images).shape
    (4, 1280)
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin, clone
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import DEFAULT_BACKBONE, Backbone, Preprocessing, load_backbone
from .images import BadImageError, ImageSource, as_source, resize_and_crop
from .runtime import PRECISIONS, RUNTIMES, cpu_supports_bf16  # noqa: F401 - re-exported (cli, bench)
from .runtime import get_runner, resolve_precision, resolve_runtime
from .runtime import PRECISION_TABLE, Calibration, QuantizedNetwork, int8, quantize_int8

logger = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embeddings of the images that could be read, their names, and the files skipped as bad.

    ``vectors`` and ``names`` hold the readable images only; ``positions[i]`` is the place of row ``i``
    in the input, so outputs can be aligned with the inputs (:meth:`aligned`); ``input_names`` names
    every input, ``errors`` maps the position of each skipped input to why it was skipped.
    """

    vectors: np.ndarray
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    positions: np.ndarray | None = None
    input_names: list[str] | None = None
    errors: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = np.arange(len(self.vectors))
        if self.input_names is None:
            self.input_names = list(self.names)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    def aligned(self, values: np.ndarray | None = None, fill: float = np.nan) -> np.ndarray:
        """``values`` (one row per readable image; default the embeddings) placed at their input positions,
        ``fill`` (NaN) in the rows of skipped inputs: outputs that line up with what was passed in."""
        values = self.vectors if values is None else np.asarray(values)
        out = np.full((self.n_inputs, *values.shape[1:]), fill, dtype=np.result_type(values.dtype, np.float32))
        out[self.positions] = values
        return out


def preprocess(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Resize the short side, centre crop; returns a (3, crop, crop) uint8 tensor.

    torchvision's Resize + CenterCrop, computed by :func:`dn2.images.resize_and_crop` so that an
    extreme aspect ratio cannot make a huge intermediate image.
    """
    image = resize_and_crop(image, pre.resize, pre.crop, pre.interpolation)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(batch: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 network input with the backbone's mean and std."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep freed activation buffers in the process (glibc): inference without page-fault storms.

    glibc returns large blocks to the kernel on every free, so each forward pass faults its
    activations in again (measured here: about half of all CPU time spent in the kernel).
    Raising the mmap and trim thresholds keeps them; set DN2_NO_MALLOC_TUNING=1 to opt out.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("DN2_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


def default_num_workers(n_images: int) -> int:
    """Decode in worker processes only when there is enough work to pay for starting them."""
    if n_images < 128:
        return 0
    return max(1, min(4, os.cpu_count() or 1))


class CropDataset(Dataset):
    """Decoded, resized uint8 crops of an image source, as ``(crop (3, H, W), index, error message)``.

    Errors are returned, not raised, per item (the message is empty for a good image, and the crop
    of a bad one is zeros), so one unreadable file does not stop a DataLoader's worker.

    Example:
        >>> import numpy as np
        >>> from dn2.backbones import Preprocessing
        >>> from dn2.images import as_source
        >>> crops = CropDataset(as_source(np.zeros((2, 40, 40, 3), np.uint8)), Preprocessing(resize=36, crop=32))
        >>> crop, index, error = crops[1]
        >>> tuple(crop.shape), crop.dtype, index, error
        ((3, 32, 32), torch.uint8, 1, '')
    """

    def __init__(self, source: ImageSource, pre: Preprocessing):
        self.source = source
        self.pre = pre

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.source.load(i, max_side=self.pre.resize)
            return preprocess(image, self.pre), i, ""
        except BadImageError as e:
            return torch.zeros(3, self.pre.crop, self.pre.crop, dtype=torch.uint8), i, str(e)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with inference for cores


def _batches(source: ImageSource, pre: Preprocessing, batch_size: int, num_workers: int,
             indices: Any = None) -> Iterator[Any]:
    """Batches of (uint8 crops, indices, error messages) of every image, or of ``indices`` only, decoded in
    ``num_workers`` forked processes."""
    return load_batches(CropDataset(source, pre), batch_size, num_workers, indices)


def load_batches(dataset: Dataset, batch_size: int, num_workers: int, indices: Any = None) -> Iterator[Any]:
    """Batches of a dataset of decoded images (e.g. :class:`CropDataset`), made in ``num_workers`` forked
    processes; of the items ``indices`` only, in that order, when given.

    The objects alive at the fork are frozen out of the garbage collector (``gc.freeze``) while the
    workers start: otherwise a worker's collector may destroy garbage inherited from the parent, and
    an OpenVINO compiled model destroyed in a forked child waits forever for its (absent) threads.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        sampler=None if indices is None else [int(i) for i in indices],
    )
    if not num_workers:
        yield from loader
        return
    gc.freeze()
    try:
        batches = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()
    yield from batches


def extract(
    backbone: Backbone | Sequence[Backbone],
    images: Any,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    precision: str = "auto",
    progress: bool = True,
    skip_bad: bool = False,
    flip: bool = False,
    runtime: str = "auto",
    calibration: Calibration | Sequence[Calibration | None] | None = None,
    network: QuantizedNetwork | Sequence[QuantizedNetwork | None] | None = None,
) -> Embeddings:
    """Embed every image of ``images`` (anything :func:`dn2.images.as_source` accepts).

    ``backbone`` may be several networks (an ensemble): each image's embedding is then the
    concatenation of theirs, in order. Networks with the same preprocessing share one decoding
    pass (each batch of crops goes through every runner), so an ensemble decodes each image once.

    ``flip`` is horizontal-flip test-time augmentation: the embedding is the mean of the
    embeddings of the image and of its mirror image (twice the compute). Averaging the features
    of flipped copies is the classic cheap TTA for CNN descriptors (Simonyan & Zisserman 2015,
    "Very deep convolutional networks", sec. 3.2; Chatfield et al. 2014, "Return of the devil in
    the details") and is applied identically to training and test images.

    A bad image raises :class:`BadImageError` naming it, or with ``skip_bad`` is warned about,
    left out of ``vectors`` and listed in ``Embeddings.skipped`` / ``errors`` (``positions`` keeps
    the readable images' places in the input).

    ``runtime`` is "openvino", "torch", "onnx" (ONNX Runtime, fp32 only) or "auto" (OpenVINO when
    installed; see :mod:`dn2.runtime`); a failed conversion falls back to torch with a warning
    (not in int8, which only OpenVINO runs: that is an error).
    ``precision="auto"`` is bf16 on CPUs with native bf16, else fp32; in both runtimes bf16 keeps the
    early high-resolution layers in fp32 (:data:`dn2.runtime.BF16_FP32_PARTS`).
    ``batch_size=None`` uses the runner's measured best. ``backbone`` itself is left unchanged.
    ``precision="int8"`` takes the images to quantise on (``calibration``, see :func:`calibrate`) or
    the quantised network (``network``), one per backbone for an ensemble: see :func:`dn2.runtime.get_runner`.
    """
    networks = [backbone] if isinstance(backbone, Backbone) else list(backbone)
    if not networks:
        raise ValueError("extract needs at least one backbone")
    source = as_source(images)
    quantized = _per_network(network, len(networks), "int8 network")
    calibrations = _per_network(calibration, len(networks), "calibration")
    n = len(source)
    ok = np.ones(n, dtype=bool)
    errors: dict[int, str] = {}
    parts: list[np.ndarray | None] = [None] * len(networks)
    groups: dict[Preprocessing, list[int]] = {}
    for j, net in enumerate(networks):
        groups.setdefault(net.config.preprocessing, []).append(j)
    workers = default_num_workers(n) if num_workers is None else num_workers
    tune_malloc()
    for pre, members in groups.items():
        runners = [get_runner(networks[j], runtime, precision, calibration=calibrations[j], network=quantized[j])
                   for j in members]
        outputs = [np.empty((n, networks[j].config.feature_dim), dtype=np.float32) for j in members]
        size = batch_size or min(r.default_batch_size for r in runners)
        bar = tqdm(total=n, unit="img", desc="embedding", disable=not progress, file=sys.stderr)
        with torch.inference_mode():
            for crops, index, messages in _batches(source, pre, size, workers):
                for i, message in zip(index.tolist(), messages):
                    if message and i not in errors:
                        if not skip_bad:
                            raise BadImageError(message)
                        warnings.warn(f"skipping {message}", stacklevel=2)
                        ok[i] = False
                        errors[i] = message
                for runner, out in zip(runners, outputs):
                    out[index.numpy()] = _run(runner, crops, pre, flip)
                bar.update(len(index))
        bar.close()
        for j, out in zip(members, outputs):
            parts[j] = out
    if errors:
        logger.info("skipped %d bad image(s) of %d", len(errors), n)
    vectors = parts[0] if len(parts) == 1 else np.hstack(parts)  # type: ignore[arg-type]
    names = source.names()
    positions = np.flatnonzero(ok)
    return Embeddings(np.ascontiguousarray(vectors[ok], dtype=np.float32), [names[i] for i in positions],
                      [errors[i] for i in sorted(errors)], positions, names, {i: errors[i] for i in sorted(errors)})


def _per_network(value: Any, n: int, what: str) -> list[Any]:
    """``value`` (one item, or a sequence of one per backbone, or None) as a list of ``n`` items."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} {what}s for {n} backbones")
        return list(value)
    if n != 1:
        raise ValueError(f"one {what} for an ensemble of {n} backbones: give one per backbone")
    return [value]


def _run(runner: Any, crops: torch.Tensor, pre: Preprocessing, flip: bool) -> np.ndarray:
    """One batch of uint8 crops through a runner (normalised first unless the runner does it in its graph)."""
    if runner.uint8_input:
        batch = crops
    else:
        batch = normalize(crops, pre).contiguous(memory_format=runner.input_memory_format)
    out = runner(batch)
    if flip:
        out = (out + runner(torch.flip(batch, dims=[3]))) / 2
    return out.numpy()


def calibrate(backbone: Backbone, images: Any, *, skip_bad: bool = False, num_workers: int | None = None) -> Calibration:
    """The int8 calibration of ``backbone`` on ``images``: the crops of an evenly spaced sample of them
    (:func:`dn2.runtime.int8.calibration_indices`), decoded and resized exactly as for embedding.

    A bad image in the sample raises :class:`BadImageError`, or with ``skip_bad`` is left out.

    Example:
        >>> import numpy as np
        >>> from dn2.backbones import load_backbone
        >>> images = np.zeros((3, 32, 32, 3), np.uint8)
        >>> calibrate(load_backbone("efficientnet_lite0"), images).crops.shape
        (3, 3, 224, 224)
    """
    source = as_source(images)
    sample = int8.calibration_indices(len(source))
    workers = default_num_workers(len(sample)) if num_workers is None else num_workers
    crops = []
    for batch, _, errors in _batches(source, backbone.config.preprocessing, int8.CALIBRATION_BATCH, workers,
                                        indices=sample):
        for crop, message in zip(batch, errors):
            if message and not skip_bad:
                raise BadImageError(message)
            if not message:  # a skipped one is warned about when the images are embedded
                crops.append(crop.numpy())
    if not crops:
        raise ValueError("no calibration image could be read")
    return Calibration.from_crops(np.stack(crops))


def backbone_names(backbone: str) -> list[str]:
    """The backbones of ``"a+b"`` (an ensemble), or ``[backbone]``; nothing is loaded."""
    return [n.strip() for n in str(backbone).split("+")]


class Embedder(TransformerMixin, BaseEstimator):
    """Images -> (N, D) float32 embeddings with a pretrained backbone (a scikit-learn transformer).

    There is nothing to learn, except with ``precision="int8"``: ``fit`` loads the backbone, and
    ``transform`` loads it on first use if ``fit`` was not called. In int8, ``fit(images)`` also
    quantises each backbone on a sample of ``images`` (:func:`calibrate`) and keeps the networks
    (``int8_networks_``), which embed everything afterwards; a model file stores them.

    Example:
        >>> from dn2 import Embedder
        >>> emb = Embedder(backbone="efficientnet_lite0", progress=False)
        >>> emb.transform(["a.jpg", "b.png"]).shape  # doctest: +SKIP
        (2, 1280)
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        precision: str = "auto",
        progress: bool = True,
        skip_bad: bool = False,
        stages: tuple[int, ...] = (),
        flip: bool = False,
        runtime: str = "auto",
    ):
        self.backbone = backbone
        self.weights = weights
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.precision = precision
        self.progress = progress
        self.skip_bad = skip_bad
        self.stages = stages
        self.flip = flip
        self.runtime = runtime

    def fit(self, X: Any = None, y: Any = None) -> "Embedder":
        """Load the backbone(s); with ``precision="int8"`` and images ``X``, also quantise each on a sample
        of them (NNCF, cached on disk). Otherwise X and y are ignored.

        ``backbone="a+b"`` is an ensemble: each image's embedding is the concatenation of the
        backbones' embeddings (in that order; see :meth:`part_dims`).
        """
        resolve_runtime(self.runtime, self.precision)
        calibrated = self._calibrated()
        if calibrated and X is not None:
            int8.require_nncf()
        names = backbone_names(self.backbone)
        if len(names) > 1 and self.weights not in (None, "random"):
            raise ValueError(f"weights=FILE names one backbone's weights; {self.backbone!r} is an ensemble of {len(names)}")
        if not all(names):
            raise ValueError(f"backbone {self.backbone!r}: an ensemble is written 'name1+name2'")
        stages = tuple(self.stages or ())
        self.networks_ = [load_backbone(name, self.weights, stages=stages) for name in names]
        self.network_ = self.networks_[0]
        self.int8_networks_: list[QuantizedNetwork] | None = None
        if calibrated and X is not None:
            source = as_source(X)
            samples: dict[Preprocessing, Calibration] = {}  # backbones with one preprocessing share one sample
            for net in self.networks_:
                if net.config.preprocessing not in samples:
                    samples[net.config.preprocessing] = calibrate(net, source, skip_bad=self.skip_bad,
                                                                  num_workers=self.num_workers)
            self.int8_networks_ = [quantize_int8(net, samples[net.config.preprocessing]) for net in self.networks_]
        return self

    def _calibrated(self) -> bool:
        """Whether this embedder's precision is quantised on its fit images (int8)."""
        return PRECISION_TABLE[resolve_precision(self.precision, self.runtime)].calibrated

    def set_int8_networks(self, networks: list[QuantizedNetwork]) -> "Embedder":
        """Use these int8 networks (one per backbone, e.g. from a model file) instead of calibrating;
        ``ValueError`` unless each takes this backbone's crops and gives its embedding width."""
        backbones = self._networks()
        if len(networks) != len(backbones):
            raise ValueError(f"{len(networks)} int8 networks for {len(backbones)} backbones")
        for network, backbone in zip(networks, backbones):
            int8.check_network(network, backbone)
        self.int8_networks_ = list(networks)
        return self

    def _int8_network(self, i: int) -> QuantizedNetwork | None:
        """The int8 network of backbone ``i`` when the precision is int8, else None."""
        if not self._calibrated():
            return None
        networks = getattr(self, "int8_networks_", None)
        if not networks:
            raise ValueError("precision='int8' embeds with the network quantised when the embedder was fitted: "
                             "call fit(images) first (a model fitted in another precision has no int8 network)")
        return networks[i]

    def _networks(self) -> list[Backbone]:
        if not hasattr(self, "network_"):
            self.fit()
        return getattr(self, "networks_", [self.network_])

    def part_dims(self) -> list[int]:
        """Embedding width of each backbone (one entry unless this is an ensemble)."""
        return [net.config.feature_dim for net in self._networks()]

    def parts(self) -> list["Embedder"]:
        """One single-backbone embedder per backbone of this one, sharing its loaded (and quantised) networks."""
        networks = self._networks()
        int8_networks = getattr(self, "int8_networks_", None)
        parts = []
        for i, (name, network) in enumerate(zip(backbone_names(self.backbone), networks)):
            part = clone(self).set_params(backbone=name)
            part.networks_, part.network_ = [network], network
            part.int8_networks_ = [int8_networks[i]] if int8_networks else None
            parts.append(part)
        return parts

    def embed(self, X: Any) -> Embeddings:
        """Embeddings with the names of the images, and the bad ones skipped (with skip_bad)."""
        networks = self._networks()
        return extract(
            networks,
            as_source(X),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            precision=self.precision,
            progress=self.progress,
            skip_bad=self.skip_bad,
            flip=bool(self.flip),
            runtime=self.runtime,
            network=[self._int8_network(i) for i in range(len(networks))],
        )

    def transform(self, X: Any) -> np.ndarray:
        """(N, D) float32 embeddings, one row per input; with skip_bad, an unreadable image's row is NaN."""
        emb = self.embed(X)
        return emb.vectors if not emb.errors else emb.aligned()

    def identity(self, precision: str | None = None) -> dict[str, Any]:
        """What makes embeddings comparable: backbone name, weights hash, preprocessing, dimension, and in
        int8 the quantised network (``"int8"``: its sha256 and how it was made). ``precision``: the one the
        embeddings were made in, if not this embedder's current one (a model scored in another precision
        still saves the identity of its fit).

        Extraction options (``stages``, ``flip``) are included only when used, so the identity of
        the paper's plain embedding (and every cache entry and model file made with it) is unchanged.
        """
        networks = self._networks()
        calibrated = PRECISION_TABLE[resolve_precision(precision or self.precision, self.runtime)].calibrated
        if len(networks) > 1:
            parts = [self._identity_of(net, i, calibrated) for i, net in enumerate(networks)]
            return {"name": "+".join(p["name"] for p in parts), "parts": parts,
                    "feature_dim": sum(p["feature_dim"] for p in parts)}
        return self._identity_of(networks[0], 0, calibrated)

    def _identity_of(self, network: Backbone, i: int, calibrated: bool) -> dict[str, Any]:
        cfg = network.config
        ident: dict[str, Any] = {
            "name": cfg.name,
            "weights_id": network.weights_id,
            "preprocessing": cfg.preprocessing.to_dict(),
            "feature_dim": cfg.feature_dim,
        }
        if network.stages:
            ident["stages"] = list(network.stages)
        if self.flip:
            ident["flip"] = True
        int8_networks = getattr(self, "int8_networks_", None)
        if int8_networks and calibrated:
            ident["int8"] = int8_networks[i].record()
        return ident
