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


def _fingerprint_before_the_registry(source) -> str:
    """The cache's fingerprint as computed before sources fingerprinted themselves (dn2 0.1.0)."""
    import hashlib
    import json

    from dn2.datasets import SubsetSource
    from dn2.images import ArraySource, FileSource, ZipSource

    h = hashlib.sha256(type(source).__name__.encode())
    if isinstance(source, SubsetSource):
        h.update(_fingerprint_before_the_registry(source.base).encode())
        h.update(np.ascontiguousarray(source.indices, dtype=np.int64).tobytes())
    elif isinstance(source, FileSource):
        stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in source.paths]
        h.update(json.dumps(stats).encode())
    elif isinstance(source, ZipSource):
        digest = hashlib.sha256(source.zip_path.read_bytes()).hexdigest()
        h.update(json.dumps([digest, source.members]).encode())
    elif isinstance(source, ArraySource) and isinstance(source.array, np.ndarray):
        h.update(str((source.array.shape, source.array.dtype.str)).encode())
        h.update(np.ascontiguousarray(source.array).tobytes())
    else:
        for i in range(len(source)):
            image = source.load(i)
            h.update(str(image.size).encode())
            h.update(image.tobytes())
    return h.hexdigest()


def test_cache_keys_are_unchanged_by_the_source_registry(image_folders, tmp_path):
    """Embeddings cached before sources fingerprinted themselves are still found."""
    import zipfile

    from PIL import Image

    from dn2.datasets import load_dataset, subset

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(image_folders["test"].rglob("*.*")):
            z.write(p, p.relative_to(image_folders["test"]).as_posix())
    folder_ds, zip_ds = load_dataset(image_folders["test"]), load_dataset(archive)
    rng = np.random.default_rng(0)
    sources = [
        as_source(image_folders["normal"]),
        as_source(archive),
        folder_ds.train.source,
        zip_ds.test.source,
        subset(subset(folder_ds.train, [2, 0]), [1]).source,
        as_source(rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)),
        as_source([rng.random((5, 6)), rng.random((4, 4, 3)).astype(np.float32)]),
        as_source([Image.new("RGBA", (3, 2), (1, 2, 3, 4)), Image.new("L", (2, 2), 9)]),
    ]
    for source in sources:
        assert fingerprint(source) == _fingerprint_before_the_registry(source), type(source).__name__
    # pinned, so that the reference above cannot drift with the code
    pinned = as_source(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    assert fingerprint(pinned) == "28cd2a37a3e2dfe2d7d886111c03c91c1920b1a1610b9645a79a73de3d9ce1b0"
