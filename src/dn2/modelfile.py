"""The dn2 model file: tensors in safetensors, a JSON header in its metadata, no pickle.

Layout: a plain safetensors file whose metadata key ``"dn2"`` holds a JSON envelope
``{"format", "format_version", "dn2_version", "tensors": {name: {"sha256"}}, "header"}``.
Loading never executes code from the file, so models from elsewhere are safe to open.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

FORMAT_NAME = "dn2-model"
FORMAT_VERSION = 1
_METADATA_KEY = "dn2"
# dtypes every safetensors>=0.4 reads back with numpy (complex64 etc. are newer or missing)
_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.float16, np.float32, np.float64))


class ModelFileError(ValueError):
    """A file that is not a valid, intact dn2 model; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:  # picklable across worker processes despite the 2-arg init
        return type(self), (self.path, self.problem)


def _dn2_version() -> str:
    """The installed dn2 version, recorded in files to help diagnose old/new mismatches."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("dn2")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def _digest(arr: np.ndarray) -> str:
    """sha256 over dtype, shape and the raw little-endian bytes, so any change is caught."""
    h = hashlib.sha256(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(np.require(arr, requirements="C").reshape(-1).view(np.uint8))
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    """Convert numpy scalars for json.dumps; reject anything else that JSON cannot hold."""
    if isinstance(obj, np.generic) and obj.dtype in _DTYPES:
        return obj.item()
    raise TypeError(f"model header value of type {type(obj).__name__} is not JSON-serialisable"
                    " (store arrays as tensors, convert other objects to str/int/float/list/dict)")


def _prepare(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names and dtypes; return C-contiguous little-endian copies/views of the arrays."""
    out = {}
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype.newbyteorder("=") not in _DTYPES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype}; "
                            f"supported: {', '.join(sorted(str(d) for d in _DTYPES))}")
        out[name] = np.require(arr, arr.dtype.newbyteorder("<"), "C")  # keeps 0-d shape
    return out


def write_model(path: str | os.PathLike, header: dict, tensors: dict[str, np.ndarray], *,
                force: bool = False) -> Path:
    """Atomically write a model file (temp file + os.replace); never overwrites unless ``force``.

    Tuples in ``header`` come back as lists; NaN/inf are rejected (not valid JSON).
    """
    path = Path(path)
    if not isinstance(header, dict):
        raise TypeError(f"model header must be a dict, got {type(header).__name__}")
    arrays = _prepare(tensors)
    envelope = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "dn2_version": _dn2_version(),
                "tensors": {name: {"sha256": _digest(a)} for name, a in arrays.items()},
                "header": header}
    try:
        text = json.dumps(envelope, default=_json_default, allow_nan=False, ensure_ascii=False)
    except ValueError as e:  # NaN/inf, circular references
        raise ValueError(f"model header is not JSON-serialisable: {e}") from None
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: directory does not exist (writing {path})")
    if not force and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path}: file exists; use --force (force=True) to overwrite it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours umask
    try:
        save_file(arrays, str(tmp), metadata={_METADATA_KEY: text})
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        if not force and (path.exists() or path.is_symlink()):  # created while we wrote
            raise FileExistsError(f"{path}: file exists; use --force (force=True) to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _open_envelope(path: Path, f: Any) -> dict:
    """Parse and check the "dn2" metadata of an open safetensors file (name, version, structure)."""
    meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ModelFileError(path, "not a dn2 model file (safetensors file without dn2 metadata)")
    try:
        env = json.loads(meta[_METADATA_KEY])
    except ValueError as e:
        raise ModelFileError(path, f"not a dn2 model file (bad JSON in dn2 metadata: {e})") from None
    if not isinstance(env, dict) or env.get("format") != FORMAT_NAME:
        raise ModelFileError(path, f"not a dn2 model file (format is not {FORMAT_NAME!r})")
    version = env.get("format_version")
    if type(version) is not int or version < 1:
        raise ModelFileError(path, f"file is corrupted or was modified (format version {version!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(path, f"written by a newer dn2 (format {version}), upgrade dn2 "
                             f"(it was written by dn2 {env.get('dn2_version', 'unknown')}; "
                             f"this dn2 reads format {FORMAT_VERSION})")
    table, header = env.get("tensors"), env.get("header")
    if (not isinstance(header, dict) or not isinstance(table, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                       for v in table.values())):
        raise ModelFileError(path, "file is corrupted or was modified (malformed dn2 metadata)")
    names = set(f.keys())
    if names != set(table):
        raise ModelFileError(path, "file is corrupted or was modified (tensors "
                             f"missing: {sorted(set(table) - names)}, extra: {sorted(names - set(table))})")
    return env


def _read(path: str | os.PathLike, with_tensors: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """Open ``path`` with safetensors (no code execution), validate, optionally load tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a dn2 model file")
    tensors: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as f:
            env = _open_envelope(path, f)
            for name in (env["tensors"] if with_tensors else ()):
                arr = f.get_tensor(name)
                if _digest(arr) != env["tensors"][name]["sha256"]:
                    raise ModelFileError(path, f"file is corrupted or was modified "
                                         f"(checksum mismatch in tensor {name!r})")
                tensors[name] = arr
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(path, f"not a dn2 model file or truncated ({e})") from None
    return env["header"], tensors


def read_model(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Load and verify a model: (header exactly as written, without integrity fields; tensors)."""
    return _read(path, with_tensors=True)


def read_header(path: str | os.PathLike) -> dict:
    """The header only, cheaply (tensors not read nor checksummed); same format checks."""
    return _read(path, with_tensors=False)[0]
