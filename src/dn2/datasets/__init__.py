"""Labelled dataset readers for the benchmark protocols.

The DN2 paper evaluates on labelled classification datasets (CIFAR-10, CIFAR-100 with its 20
coarse super-classes, Fashion-MNIST, ...): one class is "normal", the others are anomalies. This
package turns the common on-disk forms of such datasets into one small structure, a
:class:`LabelledDataset` holding a train and a test :class:`Split`, each an image source (see
:mod:`dn2.images`) plus one integer class label per image.

Supported forms (``load_dataset(path, format="auto")`` detects them from what is at ``path``),
one reader each in :data:`READERS`:

- ``"folder"``: ``train/<class>/...`` and ``test/<class>/...``, or only ``<class>/...`` (then split
  per class by ``seed`` into train/test, deterministic and stratified), optionally under one
  top-level folder (:mod:`~dn2.datasets.layout`);
- ``"zip"``: a zip archive with the same layout, read in place (no unpacking);
- ``"cifar10"`` / ``"cifar100"``: the python pickles as distributed (and as torchvision stores
  them), read with a restricted unpickler that cannot run code;
- ``"mnist"`` / ``"fashion-mnist"``: the idx files, raw or gzipped; ``"idx"`` (what detection
  finds) tells the two apart by the dataset's folder names;
- ``"csv"``: a manifest ``path,label[,split]``;
- ``"mvtec"`` (an MVTec AD category) and ``"mtd"`` / ``"mtd-mixed"`` (Magnetic Tile Defects, zip or
  folder): localisation datasets, a :class:`MaskedDataset` whose test images have ground-truth masks
  (:class:`MaskSource`), for ``dn2 bench localize``.

Nothing here downloads anything: benchmarks run on files the user already has.

Example:
    >>> from dn2.datasets import load_dataset, describe
    >>> ds = load_dataset("pets/")  # doctest: +SKIP
    >>> describe(ds)  # doctest: +SKIP
    'pets: 2 classes, train 160 images (80-80 per class), test 40 images (20-20 per class)'
"""

from .cifar import CIFAR10_DIR, CIFAR10_TRAIN_FILES, CIFAR100_DIR, Cifar10Reader, Cifar100Reader
from .core import (DatasetReader, LabelledDataset, LoadOptions, MaskedDataset, MaskSource, Split, SubsetSource, decode_mask,
                   describe, split_by_seed, subset)
from .folders import FolderReader, ZipReader
from .idx import FASHION_MNIST_CLASSES, IDX_FILES, MNIST_CLASSES, IdxReader, read_idx
from .layout import ClassLayout, class_layout
from .manifest import CsvReader
from .mtd import MtdReader, mtd_layout
from .mvtec import MvtecReader
from .registry import FORMATS, READERS, detect_reader, get_reader, load_dataset

__all__ = [
    "CIFAR100_DIR",
    "CIFAR10_DIR",
    "CIFAR10_TRAIN_FILES",
    "FASHION_MNIST_CLASSES",
    "FORMATS",
    "IDX_FILES",
    "MNIST_CLASSES",
    "READERS",
    "Cifar100Reader",
    "Cifar10Reader",
    "ClassLayout",
    "CsvReader",
    "DatasetReader",
    "FolderReader",
    "IdxReader",
    "LabelledDataset",
    "LoadOptions",
    "MaskSource",
    "MaskedDataset",
    "MtdReader",
    "MvtecReader",
    "Split",
    "SubsetSource",
    "ZipReader",
    "class_layout",
    "decode_mask",
    "describe",
    "detect_reader",
    "get_reader",
    "load_dataset",
    "mtd_layout",
    "read_idx",
    "split_by_seed",
    "subset",
]
