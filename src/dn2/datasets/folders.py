"""Class folders on disk, and the same layout inside a zip archive (read in place)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..images import BadImageError, FileSource, ZipSource, is_hidden, list_image_files, list_zip_images, open_regular, printable

from .core import DatasetReader, LabelledDataset, LoadOptions, Split, check_not_empty
from .layout import class_layout

__all__ = ["FolderReader", "ZipReader"]


def _has_subfolders(folder: Path) -> bool:
    """True if ``folder`` has a visible sub-folder (False if it cannot be listed)."""
    try:
        return any(not is_hidden(p.name) and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


class FolderReader(DatasetReader):
    """``train/<class>/`` + ``test/<class>/``, or only ``<class>/`` split by seed (see :mod:`~dn2.datasets.layout`).

    Example:
        >>> ds = load_dataset("pets/", format="folder")  # doctest: +SKIP
        >>> ds.classes  # doctest: +SKIP
        ['cat', 'dog']
    """

    name = "folder"
    looks_for = "class folders (train/<class>/, test/<class>/ or <class>/)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and _has_subfolders(path)

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        if not path.is_dir():
            raise ValueError(f"format 'folder' needs a directory, got {printable(path)}")
        name = printable(path.resolve().name)
        files = list_image_files(path)
        layout = class_layout([f.relative_to(path).parts for f in files], printable(path), options.seed, options.test_fraction)
        check_not_empty(name, "train", len(layout.train_index), path)
        check_not_empty(name, "test", len(layout.test_index), path)
        return LabelledDataset(
            name=name,
            classes=layout.classes,
            train=Split(FileSource([files[i] for i in layout.train_index], root=path), layout.train_labels),
            test=Split(FileSource([files[i] for i in layout.test_index], root=path), layout.test_labels),
        )


def _is_zip_file(path: Path) -> bool:
    """A regular file that is a zip archive (a FIFO is refused, not waited on)."""
    try:
        stream, _ = open_regular(path)
    except BadImageError:
        return False
    with stream:
        return zipfile.is_zipfile(stream)


class ZipReader(DatasetReader):
    """The class-folder layout inside a zip archive, optionally under one top-level folder, read in
    place: members are listed once and never extracted."""

    name = "zip"
    looks_for = "a zip archive"

    def detect(self, path: Path) -> bool:
        return _is_zip_file(path)

    def load(self, path: Path, options: LoadOptions) -> LabelledDataset:
        if not path.is_file():
            raise ValueError(f"format 'zip' needs a zip file, got {printable(path)}")
        name = printable(path.stem)
        members = list_zip_images(path)
        if not members:
            raise ValueError(f"no images found in zip archive {printable(path)}")
        layout = class_layout(
            [m.split("/") for m in members], f"zip archive {printable(path)}", options.seed, options.test_fraction
        )
        check_not_empty(name, "train", len(layout.train_index), path)
        check_not_empty(name, "test", len(layout.test_index), path)
        return LabelledDataset(
            name=name,
            classes=layout.classes,
            train=Split(ZipSource(path, members=[members[i] for i in layout.train_index]), layout.train_labels),
            test=Split(ZipSource(path, members=[members[i] for i in layout.test_index]), layout.test_labels),
        )
