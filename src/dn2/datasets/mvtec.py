"""One category of MVTec AD (Bergmann et al. 2019) in its folder layout, with its ground-truth masks.

    <category>/train/good/*.png                 normal training images
    <category>/test/good/*.png                  normal test images
    <category>/test/<defect>/<name>.png         defective test images, one folder per defect type
    <category>/ground_truth/<defect>/<name>_mask.png

Classes: ``good`` (0, normal) then the defect types in sorted order. A defective image without its
mask is an error naming the mask expected; masks are read (and checked: one channel, the image's
size, some defect pixel) when they are used.

Example:
    >>> ds = load_dataset("mvtec_anomaly_detection/bottle")  # doctest: +SKIP
    >>> ds.classes  # doctest: +SKIP
    ['good', 'broken_large', 'broken_small', 'contamination']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..images import FileSource, list_image_files, printable
from .core import DatasetReader, LoadOptions, MaskedDataset, MaskSource, Split, check_not_empty

__all__ = ["MVTEC_NORMAL", "MvtecReader"]

MVTEC_NORMAL = "good"


class MvtecReader(DatasetReader):
    """An MVTec AD category folder (train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png)."""

    name = "mvtec"
    looks_for = "an MVTec AD category (train/good/, test/, ground_truth/)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "train" / MVTEC_NORMAL).is_dir() and (path / "test").is_dir() \
            and (path / "ground_truth").is_dir()

    def load(self, path: Path, options: LoadOptions) -> MaskedDataset:
        if not self.detect(path):
            raise ValueError(f"format 'mvtec' needs a category folder with train/good/, test/ and ground_truth/, "
                             f"got {printable(path)}")
        name = printable(path.resolve().name)
        train_files = list_image_files(path / "train" / MVTEC_NORMAL)
        check_not_empty(name, "train", len(train_files), path)
        kinds = sorted(p.name for p in (path / "test").iterdir() if p.is_dir() and not p.name.startswith("."))
        defects = [k for k in kinds if k != MVTEC_NORMAL]
        test_files: list[Path] = []
        labels: list[int] = []
        masks: list[Path | None] = []
        for c, kind in enumerate([MVTEC_NORMAL, *defects]):
            folder = path / "test" / kind
            if not folder.is_dir():
                continue
            for f in list_image_files(folder):
                test_files.append(f)
                labels.append(c)
                if kind == MVTEC_NORMAL:
                    masks.append(None)
                    continue
                mask = path / "ground_truth" / kind / f"{f.stem}_mask.png"
                if not mask.is_file():
                    raise ValueError(f"{name}: the mask {printable(mask)} of defective image {printable(f)} is missing")
                masks.append(mask)
        check_not_empty(name, "test", len(test_files), path)
        return MaskedDataset(
            name=name, classes=[MVTEC_NORMAL, *defects],
            train=Split(FileSource(train_files, root=path), np.zeros(len(train_files), dtype=np.int64)),
            test=Split(FileSource(test_files, root=path), labels), masks=MaskSource(masks))
