"""The dn2 model file: tensors in safetensors, a JSON header in its metadata, no pickle.

Layout: a plain safetensors file whose metadata key ``"dn2"`` holds a JSON envelope
``{"format", "format_version", "dn2_version", "tensors": {name: {"sha256"}}, "header", "integrity"}``.
Loading never executes code from the file, so models from elsewhere are safe to open.

Integrity: every tensor has a sha256 of its dtype, shape and bytes, and (from format 2) ``integrity``
is the sha256 of the canonical JSON of everything else in the envelope, header included, so any
change of a setting, a name or a threshold is refused. A digest detects modification and damage; it
is not a signature (whoever can write the file can write a consistent one): what makes a file from
elsewhere safe is that nothing in it is executed and every field is validated when it is loaded.
Format 1 files (no header digest) still load, with a warning that their header is unprotected.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .outputs import atomic_path

FORMAT_NAME = "dn2-model"
FORMAT_VERSION = 2  # 2: the header is covered by the envelope's "integrity" digest
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


def _canonical_digest(envelope: dict) -> str:
    """sha256 of the envelope without its "integrity" field, as canonical JSON (sorted keys, ASCII)."""
    core = {key: value for key, value in envelope.items() if key != "integrity"}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
        envelope = json.loads(json.dumps(envelope, default=_json_default, allow_nan=False))  # as a reader sees it
        envelope["integrity"] = _canonical_digest(envelope)
        text = json.dumps(envelope, allow_nan=False)  # ASCII: lone surrogates in odd file names stay valid
    except ValueError as e:  # NaN/inf, circular references
        raise ValueError(f"model header is not JSON-serialisable: {e}") from None
    with atomic_path(path, force=force, what="model file") as tmp:
        save_file(arrays, str(tmp), metadata={_METADATA_KEY: text})
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
    if version >= 2:
        claimed = env.get("integrity")
        try:
            actual = _canonical_digest(env)
        except ValueError:  # NaN/inf smuggled into the JSON
            actual = None
        if not isinstance(claimed, str) or claimed != actual:
            raise ModelFileError(path, "file is corrupted or was modified (header checksum mismatch)")
    names = set(f.keys())
    if names != set(table):
        raise ModelFileError(path, "file is corrupted or was modified (tensors "
                             f"missing: {sorted(set(table) - names)}, extra: {sorted(names - set(table))})")
    return env


@dataclass
class ModelFile:
    """A verified model file: its header, its tensors, and what the envelope says about it.

    ``header_verified`` is False for format 1 files, whose header no digest covers.
    """

    header: dict
    tensors: dict[str, np.ndarray]
    format_version: int
    dn2_version: str
    header_verified: bool


def _read(path: str | os.PathLike, with_tensors: bool) -> ModelFile:
    """Open ``path`` with safetensors (no code execution), validate, optionally load tensors."""
    path = Path(path)
    try:
        info = os.stat(path)  # follows links: what is read is what is checked
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ModelFileError(path, "is a directory, not a dn2 model file")
    if not stat.S_ISREG(info.st_mode):  # FIFOs, devices, sockets: reading could block or never end
        raise ModelFileError(path, "is not a regular file, not a dn2 model file")
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
    version = env["format_version"]
    if version < 2:
        warnings.warn(f"{path}: model format {version} has no checksum over its settings, so a modified "
                      "setting cannot be detected; save the model again to upgrade it", UserWarning, stacklevel=3)
    return ModelFile(env["header"], tensors, version, str(env.get("dn2_version", "unknown")), version >= 2)


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Load and verify a model file, with what its envelope says (format version, header verified)."""
    return _read(path, with_tensors=True)


def read_model(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Load and verify a model: (header exactly as written, without integrity fields; tensors)."""
    model = _read(path, with_tensors=True)
    return model.header, model.tensors


def read_header(path: str | os.PathLike) -> dict:
    """The header only, cheaply (tensors not read nor checksummed); same format checks."""
    return _read(path, with_tensors=False).header
