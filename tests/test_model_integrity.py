"""Model files: every modification is refused, every field is validated, only method settings are trusted."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import dn2
from dn2 import KNNDetector
from dn2.modelfile import ModelFileError, read_model, write_model


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    det = KNNDetector(k=2, normalize="whiten").fit(rng.normal(size=(60, 6)), names=[f"n{i}.png" for i in range(60)])
    return det.save(tmp_path_factory.mktemp("m") / "det.dn2")


def _envelope(path):
    with safe_open(str(path), framework="np") as f:
        return f.metadata()["dn2"], {k: f.get_tensor(k) for k in f.keys()}


def test_one_changed_digit_of_the_threshold_is_refused(detector_file, tmp_path):
    text, arrays = _envelope(detector_file)
    threshold = json.loads(text)["header"]["detector"]["threshold"]
    edited = text.replace(repr(threshold), repr(threshold)[:-1] + str((int(repr(threshold)[-1]) + 1) % 10))
    assert edited != text
    save_file(arrays, str(tmp_path / "edited.dn2"), metadata={"dn2": edited})
    with pytest.raises(ModelFileError, match="header checksum mismatch"):
        dn2.load(tmp_path / "edited.dn2")


def _rewritten(path, tmp_path, change):
    """A consistent file (digest recomputed, as a foreign writer could make it) with a changed header."""
    header, tensors = read_model(path)
    header = copy.deepcopy(header)
    change(header, tensors)
    return write_model(tmp_path / "rewritten.dn2", header, tensors, force=True)


@pytest.mark.parametrize("change, problem", [
    (lambda h, t: h["detector"].update(threshold="high"), "threshold"),
    (lambda h, t: h["detector"].update(threshold=None), "threshold"),
    (lambda h, t: h["detector"]["params"].update(k=0), "k must be"),
    (lambda h, t: h["detector"]["params"].update(k=10**6), "cannot serve k"),
    (lambda h, t: h["detector"]["params"].update(index="rm -rf"), "index must be"),
    (lambda h, t: h["detector"]["params"].update(num_workers=64), "does not know"),
    (lambda h, t: h["detector"].update(memory_names=["a"]), "memory_names"),
    (lambda h, t: h["detector"].update(n_features_in=7), "n_features_in"),
    (lambda h, t: h["detector"].pop("params"), "parameter"),
    (lambda h, t: h.update(kind="Trojan"), "unknown model kind"),
    (lambda h, t: t.update(memory=t["memory"].astype(np.float64)), "memory"),
    (lambda h, t: t.update(kept=t["kept"][::-1].copy()), "kept"),
    (lambda h, t: t.update(memory=np.full_like(t["memory"], np.nan)), "NaN"),
    (lambda h, t: t.update({"normalize/components_": np.eye(3, dtype=np.float32)}), "transform"),
    (lambda h, t: t.update({"normalize/mean_": np.full(6, np.nan, np.float32)}), "finite"),  # found by fuzzing
    (lambda h, t: t.update({"normalize/shrinkage_": np.zeros(0, np.float32)}), "transform"),  # found by fuzzing
])
def test_malformed_fields_are_clear_errors_naming_the_file(detector_file, tmp_path, change, problem):
    path = _rewritten(detector_file, tmp_path, change)
    with pytest.raises(ModelFileError, match=problem) as error:
        dn2.load(path)
    assert "rewritten.dn2" in str(error.value)


def test_special_files_are_refused_by_type(tmp_path):
    fifo = tmp_path / "pipe.dn2"
    os.mkfifo(fifo)
    with pytest.raises(ModelFileError, match="not a regular file"):
        dn2.load(fifo)  # would block forever if opened for reading
    with pytest.raises(ModelFileError, match="not a regular file"):
        dn2.load("/dev/zero")


def _write_format_1(path, header, tensors):
    """A model file as dn2 0.1 wrote it: format 1, no digest over the header."""
    from dn2.modelfile import FORMAT_NAME

    def digest(a):
        import hashlib

        h = hashlib.sha256(f"{a.dtype.str}{list(a.shape)}".encode())
        h.update(np.require(a, requirements="C").reshape(-1).view(np.uint8))
        return h.hexdigest()

    envelope = {"format": FORMAT_NAME, "format_version": 1, "dn2_version": "0.1.0",
                "tensors": {n: {"sha256": digest(a)} for n, a in tensors.items()}, "header": header}
    save_file(tensors, str(path), metadata={"dn2": json.dumps(envelope)})


def test_format_1_files_load_with_a_warning_and_their_run_options_are_ignored(image_folders, tmp_path):
    model = dn2.DN2(preset="paper", weights="random", progress=False).fit(image_folders["normal"])
    header, tensors = read_model(model.save(tmp_path / "new.dn2"))
    old = {"kind": "DN2", "backbone": header["backbone"], "detector": header["detector"],
           "params": {**{k: v for k, v in model.get_params().items() if k != "stages"}, "stages": [],
                      "weights": "/nonexistent/evil.pth", "num_workers": 64, "runtime": "onnx", "batch_size": 4096}}
    for name in ("novelty", "normalize_params"):  # fields format 1 did not have
        old["detector"]["params"].pop(name)
    old["params"].pop("novelty")
    _write_format_1(tmp_path / "old.dn2", old, tensors)
    with pytest.warns(UserWarning, match="format 1"):
        loaded = dn2.load(tmp_path / "old.dn2")
    assert loaded.file_info_["header_verified"] is False
    assert (loaded.num_workers, loaded.runtime, loaded.batch_size, loaded.weights) == (None, "auto", None, "random")
    test = sorted(image_folders["test"].rglob("*.*"))
    np.testing.assert_array_equal(loaded.anomaly_score(test), model.anomaly_score(test))
    assert dn2.load(tmp_path / "new.dn2").file_info_["header_verified"] is True
