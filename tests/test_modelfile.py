"""Tests for dn2.modelfile: round trip, overwrite protection, and rejection of bad files."""

import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from dn2 import modelfile
from dn2.modelfile import FORMAT_VERSION, ModelFileError, read_header, read_model, write_model

HEADER = {"backbone": "efficientnet_lite0", "k": 2, "threshold": 0.125, "normalize": True,
          "layers": [[1, 2], {"name": "blocks.6", "pool": None}], "classes": ["bolt", "écrou", "ナット"]}


def tensors() -> dict:
    rng = np.random.default_rng(0)
    return {"train": rng.standard_normal((7, 5)).astype(np.float32),
            "scores": rng.standard_normal(7),  # float64
            "labels": np.arange(7, dtype=np.int64), "ids": np.arange(3, dtype=np.int32),
            "pixels": np.arange(12, dtype=np.uint8).reshape(3, 4), "mask": np.array([True, False]),
            "empty": np.zeros((0, 5), np.float32), "scalar": np.array(3.5, np.float32),
            "big_endian": np.arange(4, dtype=">f4"), "strided": np.arange(20.0).reshape(4, 5)[:, ::2]}


def save(tmp_path, name="m.dn2", **kw):
    return write_model(tmp_path / name, HEADER, tensors(), **kw)


def test_round_trip_keeps_header_and_tensors_exactly(tmp_path):
    path = save(tmp_path)
    header, loaded = read_model(path)
    assert header == HEADER and read_header(path) == HEADER
    want = tensors()
    assert loaded.keys() == want.keys()
    for name, arr in want.items():
        assert loaded[name].shape == arr.shape and loaded[name].dtype == arr.dtype.newbyteorder("=")
        np.testing.assert_array_equal(loaded[name], arr)


def test_numpy_scalars_in_header_are_converted_and_objects_rejected(tmp_path):
    write_model(tmp_path / "a.dn2", {"k": np.int64(3), "t": np.float32(0.5)}, {})
    assert read_header(tmp_path / "a.dn2") == {"k": 3, "t": 0.5}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_model(tmp_path / "b.dn2", {"train": np.zeros(3)}, {})
    with pytest.raises(TypeError, match="unsupported dtype"):
        write_model(tmp_path / "c.dn2", {}, {"x": np.array(["a"])})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dn2"]


def test_refuses_to_overwrite_without_force(tmp_path):
    path = save(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force") as err:
        write_model(path, {"other": 1}, {})
    assert str(path) in str(err.value) and path.read_bytes() == before
    write_model(path, {"other": 1}, {}, force=True)
    assert read_model(path) == ({"other": 1}, {})


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    path = save(tmp_path)
    save(tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.dn2"]

    def crash(*args, **kwargs):  # a failure half-way through writing the new model
        raise OSError("disk full")
    monkeypatch.setattr(modelfile, "save_file", crash)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        write_model(path, {"new": 1}, {}, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.dn2"] and path.read_bytes() == before


def test_truncated_file_rejected(tmp_path):
    path = save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="m.dn2"):
        read_model(path)


def test_flipped_data_byte_rejected_by_checksum(tmp_path):
    path = save(tmp_path)
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    assert len(data) > 8 + header_len  # the last byte is tensor data, not the JSON header
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert read_header(path) == HEADER  # the header is intact; only read_model checks the data
    with pytest.raises(ModelFileError, match="corrupted or was modified") as err:
        read_model(path)
    assert str(path) in str(err.value)


def test_garbage_and_empty_files_rejected(tmp_path):
    for name, content in [("garbage.dn2", np.random.default_rng(1).bytes(1000)), ("empty.dn2", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError, match=name):
            read_model(tmp_path / name)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.dn2"):
        read_model(tmp_path / "nope.dn2")
    with pytest.raises(ModelFileError, match="directory"):
        read_header(tmp_path)


def test_safetensors_without_dn2_metadata_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not a dn2 model file"):
        read_model(path)


def rewrite_envelope(path, change):
    """Re-save ``path`` with its dn2 metadata edited by ``change`` (as a foreign writer would)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        env, arrays = json.loads(f.metadata()["dn2"]), {k: f.get_tensor(k) for k in f.keys()}
    change(env, arrays)
    save_file(arrays, str(path), metadata={"dn2": json.dumps(env)})


def test_future_format_version_rejected(tmp_path):
    path = save(tmp_path)
    rewrite_envelope(path, lambda env, arrays: env.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=rf"newer dn2 \(format {FORMAT_VERSION + 1}\), upgrade dn2"):
        read_header(path)


def test_wrong_format_name_and_tensor_set_mismatch_rejected(tmp_path):
    path = save(tmp_path)
    rewrite_envelope(path, lambda env, arrays: env.update(format="other-model"))
    with pytest.raises(ModelFileError, match="not a dn2 model file"):
        read_model(path)
    path = save(tmp_path, force=True)
    rewrite_envelope(path, lambda env, arrays: arrays.pop("train"))
    with pytest.raises(ModelFileError, match="missing: \\['train'\\]"):
        read_model(path)
    path = save(tmp_path, force=True)
    rewrite_envelope(path, lambda env, arrays: arrays.update(extra=np.zeros(1)))
    with pytest.raises(ModelFileError, match="extra: \\['extra'\\]"):
        read_model(path)


class Explosive:
    """Unpickling this creates a marker file: proof that the loader ran pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_file_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "model.dn2"
    path.write_bytes(pickle.dumps({"header": HEADER, "payload": Explosive(marker)}))
    with pytest.raises(ModelFileError, match="model.dn2"):
        read_model(path)
    with pytest.raises(ModelFileError):
        read_header(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # sanity: the payload does create the marker when unpickled
    assert marker.exists()
