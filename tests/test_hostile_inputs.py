"""Hostile input (issue 12): no file can take the machine down or stop a run.

Every case is generated here, small. Cases that could exhaust memory or block are run in a child
process under an address-space cap (RLIMIT_AS above what the child had mapped after its imports)
and a timeout; the child reports the outcome and its peak RSS above that baseline.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dn2
from dn2 import config
from dn2.datasets import load_dataset
from dn2.images import BadImageError, FileSource, ZipSource, as_source, open_image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux special files and limits")

SRC = str(Path(dn2.__file__).resolve().parents[1])


def png(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **options)
    return buf.getvalue()


def run_capped(body: str, cap_mb: int, timeout: float = 60.0, imports: str = "", light: bool = True) -> dict:
    """Run ``body`` (which sets ``result``) in a child capped at ``cap_mb`` MiB of new address space.

    Returns {"ok": repr(result)} or {"bad": BadImageError message} or {"error": other exception},
    plus "peak_mb": the child's peak RSS above its post-import baseline. ``light`` children load
    dn2's subpackages without ``dn2/__init__`` (which imports torch): a fraction of a second.
    """
    stub = (
        f"import types; _pkg = types.ModuleType('dn2'); _pkg.__path__ = [{str(Path(SRC) / 'dn2')!r}]; "
        "sys.modules['dn2'] = _pkg"
    ) if light else ""
    script = textwrap.dedent(
        """
        import json, resource, sys
        {stub}
        from pathlib import Path
        from dn2 import config
        from dn2.images import BadImageError, as_source, open_image, ZipSource, FileSource
        {imports}
        def mapped():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize"):
                    return int(line.split()[1]) * 1024
        limit = mapped() + {cap} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
        {body}
            out = {{"ok": repr(result)}}
        except BadImageError as error:
            out = {{"bad": str(error)}}
        except BaseException as error:
            out = {{"error": type(error).__name__ + ": " + str(error)[:300]}}
        out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps(out))
        """
    ).format(stub=stub, imports=imports, cap=cap_mb, body=textwrap.indent(textwrap.dedent(body), "    "))
    env = {**os.environ, "PYTHONPATH": SRC, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def patch_zip_entry(path: Path, member: str, *, flags: int = 0, method: int | None = None,
                    size: int | None = None, corrupt_data: bool = False) -> None:
    """Edit the local header and central directory entry of ``member`` in place."""
    data = bytearray(path.read_bytes())
    name = member.encode()

    def find(signature: bytes, name_length_at: int, header_size: int) -> int:
        at = data.find(signature)
        while at >= 0:
            n = struct.unpack_from("<H", data, at + name_length_at)[0]
            if bytes(data[at + header_size : at + header_size + n]) == name:
                return at
            at = data.find(signature, at + 4)
        raise AssertionError(f"{member} not found")

    local, central = find(b"PK\x03\x04", 26, 30), find(b"PK\x01\x02", 28, 46)
    for at, flag_at, method_at, size_at in ((local, 6, 8, 22), (central, 8, 10, 24)):
        struct.pack_into("<H", data, at + flag_at, struct.unpack_from("<H", data, at + flag_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", data, at + method_at, method)
        if size is not None:
            struct.pack_into("<I", data, at + size_at, size)
    if corrupt_data:
        start = local + 30 + len(name) + struct.unpack_from("<H", data, local + 28)[0]
        data[start + 20] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# 1. bounded decoding


def test_one_pixel_wide_strip_is_resized_within_memory(tmp_path):
    """A 180-byte PNG of 1 x 50,000 pixels once drove one `dn2 score` to ~14 GB in the resize."""
    strip = tmp_path / "strip.png"
    strip.write_bytes(png(Image.new("L", (1, 50_000), 128), optimize=True))
    out = run_capped(
        f"""
        image = as_source([{str(strip)!r}]).load(0, max_side=256)
        result = tuple(preprocess(image, Preprocessing()).shape)
        """,
        cap_mb=400,
        timeout=120,
        imports="from dn2.backbones import Preprocessing\nfrom dn2.features import preprocess",
        light=False,  # features.preprocess itself, torch and all
    )
    assert out.get("ok") == "(3, 224, 224)", out
    assert out["peak_mb"] < 100, out


def test_16bit_png_converts_without_wide_copies(tmp_path):
    """3000 x 3000 16-bit: the int64/float64 copies cost ~220 MB; now the 2 + 4 bytes per pixel."""
    values = (np.arange(3000, dtype=np.uint32)[None, :] * 21 + np.arange(3000, dtype=np.uint32)[:, None]).astype(np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(png(Image.fromarray(values), compress_level=1))
    out = run_capped(
        f"""
        image = open_image(Path({str(path)!r}))
        result = [image.size, image.getpixel((0, 0)), image.getpixel((2999, 0)), image.getpixel((1000, 2000))]
        """,
        cap_mb=130,
    )
    expected = [(3000, 3000)] + [(v,) * 3 for v in np.rint(values[[0, 0, 2000], [0, 2999, 1000]] / 257.0).astype(int).tolist()]
    assert out.get("ok") == repr(expected), out
    assert out["peak_mb"] < 90, out


def test_image_over_the_budget_is_refused_from_its_header(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png(Image.new("I;16", (2000, 2000)), compress_level=1))  # 2 + 4 bytes x 4 Mpx = 23 MiB
    with config.config_context(image_memory=16):
        with pytest.raises(BadImageError, match=r"big\.png: image too large to decode \(2000 x 2000 I;16 .* image_memory = 16 MiB"):
            open_image(big)
    with config.config_context(image_memory=32):
        assert open_image(big).size == (2000, 2000)


def test_gif_with_a_huge_screen_and_a_tiny_frame_is_refused_from_its_header(tmp_path):
    """45 bytes declaring an 8000 x 8000 screen: the old decoder made ~1 GB of it."""
    buf = io.BytesIO()
    Image.new("P", (1, 1), 0).save(buf, "GIF", transparency=0)
    gif = bytearray(buf.getvalue())
    struct.pack_into("<HH", gif, 6, 8000, 8000)  # logical screen width and height
    path = tmp_path / "screen.gif"
    path.write_bytes(bytes(gif))
    out = run_capped(f"result = open_image(Path({str(path)!r})).size", cap_mb=200)
    assert "screen.gif: image too large to decode (8000 x 8000" in out.get("bad", ""), out
    assert out["peak_mb"] < 20, out


def test_gif_with_many_frames_decodes_the_first_frame_only(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)) for _ in range(1500)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    path = tmp_path / "frames.gif"
    path.write_bytes(buf.getvalue())
    assert Image.open(path).n_frames == 1500
    with config.config_context(image_memory=1):  # one 64 x 64 frame fits in 1 MiB; 1500 would not
        image = open_image(path)
    assert image.size == (64, 64)
    assert image.getpixel((0, 0))[0] == frames[0].convert("RGB").getpixel((0, 0))[0]


# --------------------------------------------------------------------------------------------
# 2. only regular files, with a size cap


def test_symlink_to_dev_zero_is_refused_without_reading(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    out = run_capped(f"result = FileSource([{str(tmp_path / 'zero.png')!r}]).load(0)", cap_mb=100)
    assert "zero.png: not a regular file (a character device)" in out.get("bad", ""), out


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    out = run_capped(f"result = as_source({str(tmp_path)!r}).load(0)", cap_mb=100)
    assert "pipe.png: not a regular file (a named pipe)" in out.get("bad", ""), out


def test_dangling_symlink_in_a_folder_is_one_bad_image(tmp_path):
    Image.new("L", (4, 4), 9).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "c.png").symlink_to("c.png")  # a link to itself
    source = as_source(tmp_path)
    assert source.names() == ["a.png", "b.png", "c.png"]
    assert source.load(0).getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(BadImageError, match=r"b\.png: broken symbolic link"):
        source.load(1)
    with pytest.raises(BadImageError, match=r"c\.png: cannot read file \(Too many levels of symbolic links\)"):
        source.load(2)
    assert len(source.fingerprint()) == 64  # the cache key does not trip over them either


def test_links_back_up_the_tree_are_not_walked(tmp_path):
    """A link to an ancestor (here ``..``; ``/`` alike) would walk everything above the input."""
    Image.new("L", (4, 4), 1).save(tmp_path / "outside.png")
    inside = tmp_path / "data"
    (inside / "sub").mkdir(parents=True)
    Image.new("L", (4, 4), 2).save(inside / "sub" / "a.png")
    (inside / "up").symlink_to("..")
    (inside / "sub" / "loop").symlink_to(inside)
    (inside / "elsewhere").symlink_to(tmp_path / "shared")  # a linked dataset folder is followed
    (tmp_path / "shared").mkdir()
    Image.new("L", (4, 4), 3).save(tmp_path / "shared" / "b.png")
    assert as_source(inside).names() == ["elsewhere/b.png", "sub/a.png"]


def test_non_utf8_file_names_become_printable(tmp_path):
    Image.new("L", (4, 4), 5).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9 \x1b[31m.png"))
    source = as_source(tmp_path)
    names = source.names()
    assert names == ["caf\\xe9 \\x1b[31m.png"]
    json.dumps(names, ensure_ascii=False).encode("utf-8")  # what model files and the cache write
    with open(tmp_path / "scores.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerow(names)
    assert source.load(0).getpixel((0, 0)) == (5, 5, 5)  # the file itself is still read


def test_folder_named_like_an_image_is_one_bad_image(tmp_path):
    Image.new("L", (4, 4), 1).save(tmp_path / "ok.png")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "list.csv").write_text("path,label,split\nok.png,a,train\ndir.png,a,test\n")
    ds = load_dataset(tmp_path / "list.csv")
    with pytest.raises(BadImageError, match=r"dir\.png: not a regular file \(a folder\)"):
        ds.test.source.load(0)
    with pytest.raises(BadImageError, match="not a regular file"):
        FileSource([tmp_path / "dir.png"]).load(0)


def test_files_over_the_size_cap_are_refused_before_and_while_reading(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: 1 GiB that takes no disk
        f.truncate(2**30)
    with config.config_context(max_file_bytes=2**20):
        with pytest.raises(BadImageError, match=r"big\.png: too large \(1,073,741,824 bytes; .*max_file_bytes = 1,048,576"):
            open_image(big)
    # A file that grows after its size was taken: fstat says 100 bytes, and reading must stop at
    # the cap + 1 (reading the whole GiB would break the child's 64 MiB cap).
    out = run_capped(
        f"""
        import os
        real_fstat = os.fstat
        def lying_fstat(fd):
            st = real_fstat(fd)
            return os.stat_result(st[:6] + (100,) + st[7:10])
        os.fstat = lying_fstat
        config.set_config(max_file_bytes=2**20)
        result = read_file({str(big)!r})
        """,
        cap_mb=64,
        imports="from dn2.images import read_file",
    )
    assert "big.png: too large (more than 1,048,576 bytes" in out.get("bad", ""), out
    assert out["peak_mb"] < 10, out


# --------------------------------------------------------------------------------------------
# 3. archives


@pytest.fixture
def good_png() -> bytes:
    return png(Image.new("RGB", (8, 8), (10, 20, 30)))


def test_zip_member_declaring_a_huge_size_is_not_inflated(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.png", bytes(48 * 2**20))  # 48 MiB of zeros deflate to ~50 KB
    out = run_capped(
        f"""
        config.set_config(max_file_bytes=2**20)
        result = ZipSource(Path({str(archive)!r})).load(0)
        """,
        cap_mb=32,
    )
    assert "bomb.zip:bomb.png: too large (50,331,648 bytes once inflated" in out.get("bad", ""), out
    assert out["peak_mb"] < 10, out
    with config.config_context(max_compression_ratio=100):  # within the size cap, but 1000:1
        with pytest.raises(BadImageError, match=r"bomb\.zip:bomb\.png: refusing a possible zip bomb"):
            ZipSource(archive).load(0)


def test_zip_member_lying_about_its_size_is_read_only_as_far_as_declared(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("liar.png", bytes(48 * 2**20))
    patch_zip_entry(archive, "liar.png", size=100)  # the headers now say 100 bytes
    out = run_capped(f"result = ZipSource(Path({str(archive)!r})).load(0)", cap_mb=32)
    assert "liar.zip:liar.png: cannot read from archive (BadZipFile: Bad CRC-32" in out.get("bad", ""), out
    assert out["peak_mb"] < 10, out


@pytest.mark.parametrize(
    "damage, message",
    [
        (dict(flags=0x1), "encrypted member"),
        (dict(method=99), r"unsupported compression method \(method 99\)"),
        (dict(method=zipfile.ZIP_BZIP2), r"unsupported compression method \(bzip2\)"),
        (dict(corrupt_data=True), "cannot read from archive .*Bad CRC-32"),
    ],
)
def test_damaged_zip_member_is_one_bad_image(tmp_path, good_png, damage, message):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("good.png", good_png)
        z.writestr("bad.png", good_png)
    patch_zip_entry(archive, "bad.png", **damage)
    source = as_source(archive)
    assert source.names() == ["bad.png", "good.png"]
    with pytest.raises(BadImageError, match=rf"photos\.zip:bad\.png: {message}"):
        source.load(0)
    assert source.load(1).getpixel((0, 0)) == (10, 20, 30)


def test_broken_archive_is_one_error_naming_it(tmp_path, good_png):
    archive = tmp_path / "cut.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.png", good_png)
    archive.write_bytes(archive.read_bytes()[:-10])  # the end of central directory record is cut
    with pytest.raises(ValueError, match=r"cut\.zip: not a readable zip archive"):
        as_source(archive)
    os.mkfifo(tmp_path / "pipe.zip")
    with pytest.raises(ValueError, match=r"pipe\.zip: not a regular file"):
        as_source(tmp_path / "pipe.zip")


# --------------------------------------------------------------------------------------------
# 4. skip_bad never stops on a per-file problem


def test_skip_bad_goes_on_past_every_kind_of_bad_file(lite0, tmp_path, good_png):
    from dn2.features import extract

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"good{i}.png")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("L", (8, 8), 3).save(os.path.join(os.fsencode(folder), b"na\xefve.png"))
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("locked.png", good_png)
        z.writestr("fine.png", good_png)
    patch_zip_entry(archive, "locked.png", flags=0x1)
    with pytest.warns(UserWarning, match="skipping"):
        emb = extract(lite0, [folder, archive], skip_bad=True, progress=False, num_workers=0, runtime="torch", precision="fp32")
    assert len(emb.vectors) == len(emb.names) == 5
    assert sorted(n.replace(":", "/").rsplit("/", 1)[-1] for n in emb.names) == ["fine.png", "good0.png", "good1.png", "good2.png", "na\\xefve.png"]
    assert len(emb.skipped) == 3 and all(isinstance(s, str) for s in emb.skipped)
    json.dumps([emb.names, emb.skipped], ensure_ascii=False).encode("utf-8")
