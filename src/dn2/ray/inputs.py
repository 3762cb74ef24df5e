"""Image inputs of the Ray pipeline: what ``dn2 fit``/``score`` take, plus manifests of paths anywhere.

A folder, a zip archive or image files become a source exactly as on one machine
(:func:`dn2.images.as_source`: same order, same names). A Parquet or CSV *manifest* with a
``path`` column lists the images instead; the manifest and the images may be local, on a shared
mount (NFS) or on any file system pyarrow reads (``s3://bucket/...``, ``gs://``, ``hdfs://``;
credentials from the usual environment). Relative paths in a manifest are relative to its folder.

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "list.csv").write_text("path\\na.png\\ns3://bucket/b.jpg\\n")
    >>> source = image_source(str(folder / "list.csv"))
    >>> type(source).__name__, [name.split("/")[-1] for name in source.names()]
    ('ArrowFileSource', ['a.png', 'b.jpg'])
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from PIL import Image

from ..config import get_config
from ..images import BadImageError, ImageSource, as_source, open_image, printable, read_file, read_limited

__all__ = ["MANIFEST_SUFFIXES", "ArrowFileSource", "image_source", "is_uri", "read_manifest"]

MANIFEST_SUFFIXES = (".parquet", ".csv")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (read through pyarrow's file systems), False for a local path."""
    return "://" in path


def _open_fs(uri: str) -> tuple[pa_fs.FileSystem, str]:
    try:
        return pa_fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as error:  # unknown scheme, bad URI, no credentials (ArrowInvalid is a ValueError)
        raise ValueError(f"{printable(uri)}: cannot open its file system ({error})") from None


def read_manifest(manifest: str) -> list[str]:
    """The ``path`` column of a Parquet or CSV manifest (local or a URI), relative paths resolved.

    ValueError naming the manifest when it has no ``path`` column or holds empty paths.
    """
    try:
        if is_uri(manifest):
            fs, inner = _open_fs(manifest)
            parent = manifest.rsplit("/", 1)[0]
        else:
            fs, inner, parent = None, manifest, str(Path(manifest).parent)
        if manifest.lower().endswith(".parquet"):
            table = pq.read_table(inner, columns=["path"], filesystem=fs)
        else:
            options = pa_csv.ConvertOptions(column_types={"path": "string"}, include_columns=["path"])
            if fs is None:
                table = pa_csv.read_csv(inner, convert_options=options)
            else:
                with fs.open_input_stream(inner) as stream:
                    table = pa_csv.read_csv(stream, convert_options=options)
    except (KeyError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{printable(manifest)}: not a manifest with a 'path' column ({error})") from None
    paths = table.column("path").to_pylist()
    if not paths:
        raise ValueError(f"{printable(manifest)}: the manifest lists no images")
    if any(not p for p in paths):
        raise ValueError(f"{printable(manifest)}: row {paths.index(next(p for p in paths if not p))} has an empty path")
    return [p if is_uri(p) or os.path.isabs(p) else f"{parent}/{p}" for p in paths]


class ArrowFileSource(ImageSource):
    """Images named by paths or URIs: local paths read by :func:`dn2.images.read_file` (regular files
    only), URIs through pyarrow's file systems; both within ``dn2.config`` ``max_file_bytes``.

    Names are the paths as given. Picklable: each process opens its own file systems.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = [str(p) for p in paths]
        self._systems: dict[str, pa_fs.FileSystem] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self._systems = state["paths"], {}

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return printable(self.paths[i])

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i``; any failure is a :class:`BadImageError` naming it."""
        path, name = self.paths[i], self.name(i)
        if not is_uri(path):
            return read_file(path, name=name)
        limit = get_config()["max_file_bytes"]
        root = path.split("://", 1)[0] + "://" + path.split("://", 1)[1].split("/", 1)[0]
        try:
            if root not in self._systems:
                self._systems[root] = _open_fs(path)[0]
            fs, inner = self._systems[root], pa_fs.FileSystem.from_uri(path)[1]
            info = fs.get_file_info(inner)
            if info.type != pa_fs.FileType.File:
                raise BadImageError(f"{name}: {'no such file' if info.type == pa_fs.FileType.NotFound else 'not a file'}")
            if info.size is not None and info.size > limit:
                raise BadImageError(f"{name}: too large ({info.size:,} bytes; the limit is dn2.config max_file_bytes)")
            with fs.open_input_stream(inner) as stream:
                return read_limited(stream, limit, name, expected=info.size)
        except (OSError, ValueError) as error:
            if isinstance(error, BadImageError):
                raise
            raise BadImageError(f"{name}: cannot read it ({error})") from None

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        return open_image(self.read_bytes(i), name=self.name(i), max_side=max_side)

    def fingerprint(self) -> str:
        """The paths, in order (nothing is read)."""
        return hashlib.sha256(json.dumps([type(self).__name__, self.paths]).encode()).hexdigest()


def image_source(images: Any) -> ImageSource:
    """The source of the pipeline's inputs: one Parquet/CSV manifest (local or URI), or anything
    :func:`dn2.images.as_source` takes (folders, zips, files; one input or a list)."""
    single = images[0] if isinstance(images, (list, tuple)) and len(images) == 1 else images
    if isinstance(single, (str, os.PathLike)):
        text = os.fspath(single)
        if text.lower().endswith(MANIFEST_SUFFIXES):
            if not is_uri(text) and not Path(text).is_file():
                raise FileNotFoundError(f"no such manifest: {printable(text)}")
            return ArrowFileSource(read_manifest(text))
        if is_uri(text):
            raise ValueError(f"{printable(text)}: give images on remote storage as a Parquet or CSV manifest of paths")
    return as_source(images)
