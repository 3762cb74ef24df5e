"""Patch features: one locally aware feature vector per location of a backbone's intermediate grid.

:class:`PatchNet` is a plain torch module built from a loaded backbone (PatchCore's features, Roth et
al. 2022): it runs the backbone only as deep as the deepest chosen stage, averages each chosen
stage's output over every 3x3 neighbourhood (stride 1, so each location sees its neighbours),
upsamples the deeper stages bilinearly to the shallowest one's grid and concatenates them. The
default stages are the ones at stride 8 and 16 (``(-3, -2)``: EfficientNet-Lite blocks 2 and 4,
ResNet layer2 and layer3), measured best for maps on MTD (``docs/research/maps.md``, Table 1: shallower stages lost image
ROCAUC, adding the stride-32 stage lost PRO).

A ``PatchNet`` looks like a backbone to :func:`dn2.runtime.get_runner` (``config``, ``weights_id``,
``stages``), under its own name ``<backbone>:patches`` and with the input size as its crop, so its
exports are cached apart from the pooled backbone's, on every runtime and precision; its
``bf16_parts`` keeps the backbone's early layers in fp32 as the image-level path does. Its output
is (N, h * w * D): the grid in row-major order, each location's D features contiguous.

Images are *squashed* to ``size`` x ``size`` (aspect ratio not kept, nothing cropped), so every
pixel of the original is covered by the grid and the map can be sampled back at the original's
(H, W) (:func:`dn2.maps.memory.grid_to_map`). Decoding is dn2's bounded one (:mod:`dn2.images`) at
full resolution, because the map needs the original size.

Example:
    >>> import torch
    >>> from dn2.backbones import load_backbone
    >>> net = PatchNet(load_backbone("efficientnet_lite0", weights="random"), stages=(-3, -2), size=64)
    >>> net.grid, net.dim, net.config.name
    ((8, 8), 152, 'efficientnet_lite0:patches')
    >>> net(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 9728])
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..backbones import Backbone, load_backbone, stage_modules
from ..features import backbone_names, default_num_workers, load_batches, normalize, tune_malloc
from ..images import RESAMPLE, BadImageError, ImageSource, as_source
from ..runtime import bf16_parts, get_runner

__all__ = ["DEFAULT_STAGES", "PatchBatch", "PatchNet", "SquashDataset", "load_patch_nets", "patch_batches"]

#: The stages at stride 8 and 16, counted from the deepest (see the module docstring).
DEFAULT_STAGES: tuple[int, ...] = (-3, -2)
AGGREGATE = 3  # neighbourhood averaged at each location (PatchCore's p = 3)
CHECK_SIZE = 64  # input side of the one forward pass that checks a PatchNet against its backbone (cheap)


def _stage_names(body: nn.Module, stages: tuple[int, ...]) -> tuple[tuple[int, ...], list[str]]:
    """Stage indices made non-negative and sorted shallow to deep, and their module names."""
    levels = stage_modules(body)
    if not stages:
        raise ValueError("map_stages: at least one stage is needed")
    resolved = set()
    for s in stages:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not -len(levels) <= s < len(levels):
            raise ValueError(f"map_stages: stage {s!r} out of range, the network has {len(levels)} stages "
                             f"(0..{len(levels) - 1} or negative from the deepest)")
        resolved.add(int(s) % len(levels))
    ordered = tuple(sorted(resolved))
    return ordered, [levels[i][0] for i in ordered]


def _forward_order(body: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) in the order the body's forward runs them, up to the deepest of ``names``.

    The body's children are taken in registration order, descending into those that hold a stage
    (``blocks`` for ``blocks.2``). That this *is* the forward order is checked by :class:`PatchNet`
    against hooks on the body's own forward.
    """
    order: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name not in names and any(n.startswith(name + ".") for n in names):
                if walk(child, name + "."):
                    return True
            else:
                order.append((name, child))
                if name == names[-1]:
                    return True
        return False

    if not walk(body, ""):
        raise ValueError(f"cannot find stage {names[-1]!r} in {type(body).__name__}")
    return order


class PatchTail(nn.Module):
    """The layers after the early piece, the stage outputs they give, and their aggregation into patch features."""

    def __init__(self, layers: list[tuple[str, nn.Module]], captures: list[str]):
        super().__init__()
        self.layers = nn.ModuleList([m for _, m in layers])
        self.capture_at = [i for i, (name, _) in enumerate(layers) if name in captures]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.capture_at:
                maps.append(x)
        return aggregate(maps)


def aggregate(maps: list[torch.Tensor]) -> torch.Tensor:
    """Stage outputs (N, C_i, h_i, w_i), shallow first -> (N, h * w * sum C_i): 3x3 average, deeper stages
    upsampled to the first one's grid, concatenated, laid out location by location."""
    parts = []
    size = maps[0].shape[-2:]
    for m in maps:
        m = F.avg_pool2d(m.float(), AGGREGATE, stride=1, padding=AGGREGATE // 2)  # zeros beyond the border, as measured
        if m.shape[-2:] != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        parts.append(m)
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1).flatten(1)


class PatchNet(nn.Module):
    """A backbone's locally aware patch features at a fixed square input ``size``: (N, 3, S, S) -> (N, h*w*D).

    ``stages`` index :func:`dn2.backbones.stage_modules` (negative from the deepest). The layers are
    the backbone's own (shared, not copied); only the layers up to the deepest stage run.
    Attributes: ``grid`` (h, w), ``dim`` D, ``stages`` (resolved), ``config`` (name
    ``<backbone>:patches``, crop = resize = ``size``, ``feature_dim`` h*w*D), ``weights_id``.
    """

    def __init__(self, backbone: Backbone, stages: tuple[int, ...] = DEFAULT_STAGES, size: int = 224):
        super().__init__()
        body = backbone.body
        self.stages, names = _stage_names(body, tuple(stages))
        order = _forward_order(body, names)
        early = self._early_modules(backbone, order, names)
        self.early = nn.Sequential(*[m for _, m in order[:len(early)]])
        self.tail = PatchTail(order[len(early):], names)
        self.split = bool(early)
        self.size = int(size)
        self.weights_id = backbone.weights_id
        self.grid, self.dim = self._check_forward_order(body, names)
        pre = replace(backbone.config.preprocessing, resize=self.size, crop=self.size)
        self.config = replace(backbone.config, name=f"{backbone.config.name}:patches",
                              feature_dim=self.grid[0] * self.grid[1] * self.dim, preprocessing=pre)
        self.eval()

    @staticmethod
    def _early_modules(backbone: Backbone, order: list[tuple[str, nn.Module]], names: list[str]) -> list[nn.Module]:
        """The backbone's bf16 "early" piece when it is a prefix of ``order`` holding no stage; else []."""
        parts = bf16_parts(backbone)
        early = next((mods for name, mods in parts or [] if name == "early"), [])
        prefix = [m for _, m in order[:len(early)]]
        if not early or len(prefix) != len(early) or any(a is not b for a, b in zip(prefix, early)):
            return []
        if any(name in names for name, _ in order[:len(early)]):
            return []
        return early

    @torch.no_grad()
    def _check_forward_order(self, body: nn.Module, names: list[str]) -> tuple[tuple[int, int], int]:
        """Run the body's own forward with hooks and this module on one small input: the stage outputs must
        agree. Returns the grid at ``size`` (the shallowest stage's stride, as in these networks' padding:
        ceil(size / stride); the first batch's reshape checks it) and the feature dimension."""
        captured: dict[str, torch.Tensor] = {}
        hooks = [body.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: captured.__setitem__(n, out)) for n in names]
        probe = CHECK_SIZE
        x = torch.randn(1, 3, probe, probe, generator=torch.Generator().manual_seed(0))
        try:
            body(x)
        finally:
            for h in hooks:
                h.remove()
        ours = self(x)
        expected = aggregate([captured[n] for n in names])
        if ours.shape != expected.shape or not torch.allclose(ours, expected, rtol=1e-4, atol=1e-5):
            raise ValueError(f"maps: the stages of {type(body).__name__} cannot be run in sequence "
                             "(its forward is not the composition of its layers); choose another backbone")
        h, w = captured[names[0]].shape[-2:]
        stride = probe // int(h)
        if probe % int(h) or probe // int(w) != stride:
            raise ValueError(f"maps: cannot tell the stride of stage {names[0]!r} of {type(body).__name__}")
        grid = (-(-self.size // stride), -(-self.size // stride))
        return grid, int(expected.shape[1] // (h * w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.early(x))

    def bf16_parts(self) -> list[tuple[str, list[nn.Module]]] | None:
        """The pieces for bf16 (:func:`dn2.runtime.bf16_parts`): the backbone's early layers, then the rest."""
        if not self.split:
            return None
        return [("early", list(self.early)), ("rest", [self.tail])]

    def identity(self) -> dict[str, Any]:
        """What makes patch features comparable, as stored in model files (like an embedder's identity)."""
        return {"name": self.config.name, "weights_id": self.weights_id,
                "preprocessing": self.config.preprocessing.to_dict(), "stages": list(self.stages),
                "grid": list(self.grid), "dim": self.dim}


def load_patch_nets(backbone: str, weights: Any = None, stages: tuple[int, ...] = DEFAULT_STAGES,
                    size: int = 224) -> list[PatchNet]:
    """One :class:`PatchNet` per backbone of ``backbone`` (``"a+b"``: an ensemble, features concatenated per location)."""
    names = backbone_names(backbone)
    if len(names) > 1 and weights not in (None, "random"):
        raise ValueError(f"weights=FILE names one backbone's weights; map_backbone {backbone!r} is an ensemble")
    nets = [PatchNet(load_backbone(name, weights), stages, size) for name in names]
    grids = {net.grid for net in nets}
    if len(grids) > 1:
        raise ValueError(f"map_backbone {backbone!r}: the backbones' grids differ ({sorted(grids)}) at map_size={size}")
    return nets


class SquashDataset(Dataset):
    """Images squashed to ``size`` x ``size`` (uint8 (3, S, S)), with their position, error message and original (H, W).

    ``indices`` selects (and orders) images of the source; item ``i`` is image ``indices[i]``. The image is decoded at full resolution (within ``dn2.config`` ``image_memory``): the map is made
    at the original's size, which a reduced JPEG decode would not give exactly.

    Example:
        >>> crops = SquashDataset(as_source(np.zeros((1, 30, 50, 3), np.uint8)), 16)
        >>> crop, index, error, height, width = crops[0]
        >>> tuple(crop.shape), index, error, height, width
        ((3, 16, 16), 0, '', 30, 50)
    """

    def __init__(self, source: ImageSource, size: int, interpolation: str = "bicubic",
                 indices: Sequence[int] | None = None):
        self.source = source
        self.size = size
        self.resample = RESAMPLE[interpolation]
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, int, int]:
        try:
            image = self.source.load(int(self.indices[i]))
        except BadImageError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), i, str(e), 0, 0
        squashed = image.resize((self.size, self.size), self.resample)
        pixels = torch.from_numpy(np.asarray(squashed, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels, i, "", image.height, image.width


@dataclass
class PatchBatch:
    """Patch features of some images: ``features[j]`` (h, w, D) float32 is the image at position ``rows[j]``
    of those iterated (the source, or its ``indices``), whose original size was ``sizes[j]`` (H, W)."""

    rows: np.ndarray
    features: np.ndarray
    sizes: list[tuple[int, int]]


def patch_batches(nets: list[PatchNet], images: Any, *, indices: Sequence[int] | None = None, runtime: str = "auto",
                  precision: str = "auto", batch_size: int | None = None, num_workers: int | None = None,
                  progress: bool = False, skip_bad: bool = False, skipped: list[str] | None = None,
                  desc: str = "patches") -> Iterator[PatchBatch]:
    """Patch features of the images (those at ``indices`` of the source, if given), a batch at a time.

    Memory: a few batches, whatever the number of images. An ensemble's features are concatenated per
    location (each backbone's D columns in turn). A bad image raises :class:`BadImageError` or, with
    ``skip_bad``, is warned about, left out (its row does not appear) and its message appended to ``skipped``.

    Example:
        >>> nets = load_patch_nets("efficientnet_lite0", "random", size=64)
        >>> batch = next(patch_batches(nets, np.zeros((3, 40, 90, 3), np.uint8), indices=[2, 0], runtime="torch"))
        >>> batch.rows.tolist(), batch.features.shape, batch.sizes
        ([0, 1], (2, 8, 8, 152), [(40, 90), (40, 90)])
    """
    source = as_source(images)
    runners = [get_runner(net, runtime, precision) for net in nets]
    pre = nets[0].config.preprocessing
    dataset = SquashDataset(source, pre.crop, pre.interpolation, indices)
    workers = default_num_workers(len(dataset)) if num_workers is None else num_workers
    batch_size = batch_size or runners[0].default_batch_size
    h, w = nets[0].grid
    tune_malloc()
    bar = tqdm(total=len(dataset), unit="img", desc=desc, disable=not progress, file=sys.stderr)
    try:
        with torch.inference_mode():
            for crops, index, errors, heights, widths in load_batches(dataset, batch_size, workers):
                ok = np.array([not message for message in errors], dtype=bool)
                for message in (m for m in errors if m):
                    if not skip_bad:
                        raise BadImageError(message)
                    warnings.warn(f"skipping {message}", stacklevel=2)
                    if skipped is not None:
                        skipped.append(message)
                bar.update(len(index))
                if not ok.any():
                    continue
                good = torch.from_numpy(ok)
                parts = []
                for net, runner in zip(nets, runners):
                    batch = crops[good]
                    if not runner.uint8_input:
                        batch = normalize(batch, net.config.preprocessing).contiguous(memory_format=runner.input_memory_format)
                    parts.append(runner(batch).numpy().reshape(len(batch), h, w, net.dim))
                features = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
                sizes = [(int(a), int(c)) for a, c, good_row in zip(heights, widths, ok) if good_row]
                yield PatchBatch(index.numpy()[ok], np.ascontiguousarray(features, dtype=np.float32), sizes)
    finally:
        bar.close()
