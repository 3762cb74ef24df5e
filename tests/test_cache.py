"""The embedding cache: a second embedding of the same images is read back, a change is not."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dn2 import Embedder
from dn2.cache import cached_embed, fingerprint
from dn2.images import as_source


@pytest.fixture
def embedder(lite0):
    emb = Embedder(progress=False)
    emb.network_ = lite0
    return emb


def test_second_call_is_read_from_cache(embedder, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)
    first = cached_embed(embedder, images, tmp_path)
    assert len(list(tmp_path.glob("*.dn2emb"))) == 1
    monkeypatch.setattr(embedder, "embed", lambda X: pytest.fail("should have been cached"))
    again = cached_embed(embedder, images, tmp_path)
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert again.names == first.names


def test_changed_pixels_or_files_miss_the_cache(embedder, image_folders, tmp_path):
    images = np.zeros((3, 16, 16), dtype=np.uint8)
    cached_embed(embedder, images, tmp_path)
    images[0, 0, 0] = 1
    cached_embed(embedder, images, tmp_path)
    assert len(list(tmp_path.glob("*.dn2emb"))) == 2

    before = fingerprint(as_source(image_folders["normal"]))
    f = image_folders["normal"] / "n00.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert fingerprint(as_source(image_folders["normal"])) != before


def test_no_cache_writes_nothing(embedder, tmp_path):
    cached_embed(embedder, np.zeros((2, 8, 8), dtype=np.uint8), tmp_path / "c", use_cache=False)
    assert not (tmp_path / "c").exists()


def test_damaged_entry_is_recomputed(embedder, tmp_path):
    images = np.full((2, 8, 8), 7, dtype=np.uint8)
    first = cached_embed(embedder, images, tmp_path)
    entry, = tmp_path.glob("*.dn2emb")
    entry.write_bytes(entry.read_bytes()[:100])
    np.testing.assert_allclose(cached_embed(embedder, images, tmp_path).vectors, first.vectors, rtol=1e-5)


def test_zip_archive_is_known_by_its_bytes_not_its_copy(image_folders, tmp_path):
    import shutil
    import zipfile

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(image_folders["normal"].glob("*.png")):
            z.write(p, p.name)
    copy = tmp_path / "copy" / "a.zip"
    copy.parent.mkdir()
    shutil.copy(archive, copy)  # a new path and a new mtime: same images, same entry
    os.utime(copy, ns=(0, 10**9))
    assert fingerprint(as_source(copy)) == fingerprint(as_source(archive))
    with zipfile.ZipFile(copy, "a") as z:
        z.writestr("extra.png", (image_folders["normal"] / "n00.png").read_bytes())
    assert fingerprint(as_source(copy)) != fingerprint(as_source(archive))
