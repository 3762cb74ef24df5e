"""Fuzz cases for dn2's input handling, run one after another in a capped worker process.

Each case is generated from (kind, seed) alone, so a failing case is reproduced by its id. The worker
prints one JSON line before and after each case; the parent (tests/test_fuzz.py) reads them, so a case
that kills the worker (memory cap, crash) or hangs (time cap) is named by its last "start" line.

Kinds:
- ``image``: every format Pillow writes and dn2 decodes, in many modes, with extreme sizes and aspect
  ratios, bit depths and frame counts, then often corrupted (byte flips, truncation, header fields
  rewritten with valid checksums); read through ``dn2.images.open_image`` and ``resize_and_crop``.
- ``archive``: zip archives with lying sizes, encryption flags, unknown methods, corrupt data, odd
  names; listed and read through ``dn2.images.as_source``.
- ``special``: FIFOs, device links, dangling and looping links, folders named like images.
- ``model``: a real model file with random byte mutations (digests not recomputed) or random header
  field mutations (digests recomputed, as a foreign writer could), opened with ``dn2.load``.

Outcomes: "ok" (a correct result), "refused" (the library's clean error type for that input), or
"bug" (any other exception, or a wrong result): the parent fails on "bug".
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX", "SGI", "QOI", "IM"]
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
SIZES = [(1, 1), (1, 4000), (4000, 1), (7, 3), (64, 48), (300, 200), (1, 60000), (2500, 2500)]


def _rng(kind: str, seed: int) -> random.Random:
    return random.Random(f"{kind}:{seed}")


def _encode(rng: random.Random) -> bytes:
    """A valid image file of a random format, mode, size and frame count (or the closest Pillow allows)."""
    fmt = rng.choice(FORMATS)
    mode = rng.choice(MODES)
    w, h = rng.choice(SIZES)
    if w * h > 2_000_000 and fmt not in ("PNG", "GIF", "TIFF", "BMP"):
        w, h = 64, 48  # keep generation itself cheap; the big ones come from header rewrites below
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    try:
        im = im.convert(mode) if mode not in ("I;16", "I", "F") else im.convert("L").convert(mode)
    except ValueError:
        pass
    buf = io.BytesIO()
    frames = rng.choice([1, 1, 1, 3, 40]) if fmt in ("GIF", "TIFF", "PNG", "WEBP") else 1
    if frames * w * h > 4_000_000:  # many frames are about counting, not size: keep generation itself small
        frames = 1
    try:
        if frames > 1:
            im.save(buf, fmt, save_all=True, append_images=[im] * (frames - 1))
        else:
            im.save(buf, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _png_with_size(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header claims this size (CRC correct) and whose data is a small compressed stream."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    how = rng.choice(["flip", "flip", "truncate", "extend", "zero_run", "none"])
    if how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        data = data[: rng.randrange(max(1, len(data)))]
    elif how == "extend":
        data += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    elif how == "zero_run" and data:
        start = rng.randrange(len(data))
        n = min(rng.randint(1, 64), len(data) - start)
        data[start : start + n] = b"\0" * n
    return bytes(data)


def image_case(seed: int, tmp: Path) -> str:
    from dn2.images import BadImageError, open_image, resize_and_crop

    rng = _rng("image", seed)
    if rng.random() < 0.15:
        data = _png_with_size(rng.choice([1, 10**5, 2**31 - 1, 60000]), rng.choice([1, 10**5, 2**31 - 1, 3]),
                              rng.choice([1, 8, 16]), rng.choice([0, 2, 6]))
    else:
        data = _encode(rng)
        if rng.random() < 0.6:
            data = _corrupt(data, rng)
    path = tmp / f"case{seed}.{rng.choice(['png', 'jpg', 'tif', 'gif', 'bmp', 'webp'])}"  # the name never decides
    path.write_bytes(data)
    del data
    try:
        image = open_image(path)
        crop = resize_and_crop(image, 256, 224, rng.choice(["bilinear", "bicubic"]))
    except BadImageError:
        return "refused"
    if image.mode != "RGB" or crop.size != (224, 224) or crop.mode != "RGB":
        raise AssertionError(f"wrong result: {image.mode} {crop.size} {crop.mode}")
    return "ok"


def _zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, method in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            z.writestr(info, data)
    return buf.getvalue()


def _patch_zip(data: bytes, rng: random.Random) -> bytes:
    """Lie in a random local or central header field (sizes, method, flags) or corrupt compressed bytes."""
    data = bytearray(data)
    spots = [i for i in range(len(data) - 4) if data[i : i + 4] in (b"PK\x03\x04", b"PK\x01\x02")]
    if not spots:
        return bytes(data)
    at = rng.choice(spots)
    central = data[at : at + 4] == b"PK\x01\x02"
    field = rng.choice(["flags", "method", "csize", "usize", "crc"])
    offset = {"flags": 6, "method": 8, "crc": 14, "csize": 18, "usize": 22}[field] + (2 if central else 0)
    size = 2 if field in ("flags", "method") else 4
    value = {"flags": 0x0001, "method": rng.choice([1, 6, 12, 14, 99]), "crc": rng.getrandbits(32),
             "csize": rng.choice([0, 1, 2**32 - 1]), "usize": rng.choice([0, 1, 2**30, 2**32 - 1])}[field]
    data[at + offset : at + offset + size] = value.to_bytes(size, "little")
    return bytes(data)


def archive_case(seed: int, tmp: Path) -> str:
    from dn2.images import BadImageError, as_source

    rng = _rng("archive", seed)
    members = []
    for j in range(rng.randint(1, 4)):
        name = rng.choice([f"img{j}.png", f"../../evil{j}.png", f"/abs/{j}.png", f"d\udcff{j}.png",
                           f"deep/{'x/' * 50}{j}.png", f".hidden{j}.png", f"__MACOSX/{j}.png"])
        payload = _encode(rng) if rng.random() < 0.7 else b"\0" * rng.choice([10, 10**6, 8 * 10**6])
        members.append((name.encode("utf-8", "surrogateescape").decode("latin-1"), payload,
                        rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])))
    data = _zip_bytes(members)
    if rng.random() < 0.6:
        data = _patch_zip(data, rng)
    if rng.random() < 0.2:
        data = _corrupt(data, rng)
    path = tmp / f"archive{seed}.zip"
    path.write_bytes(data)
    try:
        source = as_source(path)
    except (ValueError, BadImageError):
        return "refused"  # not a readable archive, or no image members: one clear error naming it
    outcomes = set()
    for i in range(len(source)):
        try:
            if source.load(i).mode != "RGB":
                raise AssertionError("not RGB")
            outcomes.add("ok")
        except BadImageError as e:
            if str(path) not in str(e):
                raise AssertionError(f"error does not name the archive: {e}") from None
            outcomes.add("refused")
    return "ok" if outcomes == {"ok"} else "refused"


def special_case(seed: int, tmp: Path) -> str:
    from dn2.images import BadImageError, open_image

    rng = _rng("special", seed)
    kind = ["fifo", "dev_zero", "dev_urandom", "dangling", "loop", "folder", "empty", "self_link"][seed % 8]
    path = tmp / f"special{seed}.png"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "dev_urandom":
        path.symlink_to("/dev/urandom")
    elif kind == "dangling":
        path.symlink_to(tmp / f"missing{rng.random()}")
    elif kind == "loop":
        other = tmp / f"loop{seed}.png"
        path.symlink_to(other)
        other.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.symlink_to(path.name)
    try:
        open_image(path)
    except BadImageError as e:
        if path.name not in str(e):
            raise AssertionError(f"error does not name the file: {e}") from None
        return "refused"
    raise AssertionError(f"{kind} was read as an image")


_MODEL: dict[str, object] = {}


def _model_file(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """One real detector model file (built once per worker) and the scores it gives to fixed queries."""
    if not _MODEL:
        from dn2 import KNNDetector

        rng = np.random.default_rng(0)
        det = KNNDetector(k=2, normalize="whiten", index="ivf", index_params={"nlist": 4, "nprobe": 2})
        det.fit(rng.normal(size=(80, 6)), names=[f"n{i}.png" for i in range(80)])
        queries = rng.normal(size=(10, 6))
        _MODEL.update(path=det.save(tmp / "base.dn2"), queries=queries, scores=det.anomaly_score(queries))
    return _MODEL["path"], _MODEL["queries"], _MODEL["scores"]  # type: ignore[return-value]


def _mutate_json(value: object, rng: random.Random, depth: int = 0) -> object:
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        out = dict(value)
        action = rng.choice(["replace", "replace", "delete", "add", "recurse", "recurse", "recurse"])
        if action == "delete":
            out.pop(key)
        elif action == "add":
            out[f"x{rng.randrange(100)}"] = rng.choice([1, "a", None, [1], {"a": 1}])
        elif action == "recurse" and depth < 6:
            out[key] = _mutate_json(value[key], rng, depth + 1)
        else:
            out[key] = rng.choice([None, True, -1, 0, 2**63, 1e308, "", "x" * 1000, [], {}, [None], 0.5, "exact"])
        return out
    if isinstance(value, list) and value:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate_json(out[i], rng, depth + 1) if rng.random() < 0.5 else rng.choice([None, 3, "z", []])
        return out
    return rng.choice([None, True, -1, 0, 2**63, 1e308, "", [], {}])


def model_case(seed: int, tmp: Path) -> str:
    import dn2
    from dn2.modelfile import ModelFileError, read_model, write_model

    rng = _rng("model", seed)
    base, queries, scores = _model_file(tmp)
    path = tmp / f"model{seed}.dn2"
    if rng.random() < 0.5:
        path.write_bytes(_corrupt(base.read_bytes(), rng))
        semantic_change_possible = False  # digests were not recomputed: any change must be refused
    else:
        header, tensors = read_model(base)
        if rng.random() < 0.7:
            header = _mutate_json(header, rng)
        else:
            name = rng.choice(sorted(tensors))
            a = tensors[name]
            choice = rng.choice(["dtype", "shape", "nan", "empty", "drop"])
            if choice == "dtype":
                tensors[name] = a.astype(rng.choice([np.float64, np.int32, np.uint8, np.float16]))
            elif choice == "shape":
                tensors[name] = a.reshape(-1) if a.ndim > 1 else np.tile(a, 2)
            elif choice == "nan" and a.dtype.kind == "f" and a.size:
                a = a.copy()
                a.flat[0] = np.nan
                tensors[name] = a
            elif choice == "empty":
                tensors[name] = a[:0]
            else:
                tensors.pop(name)
        try:
            write_model(path, header if isinstance(header, dict) else {"kind": header}, tensors, force=True)
        except (ValueError, TypeError):
            return "refused"  # the writer itself refuses it (NaN in JSON, unsupported dtype)
        semantic_change_possible = True
    try:
        model = dn2.load(path)
    except ModelFileError:
        return "refused"
    got = model.anomaly_score(queries)
    if not semantic_change_possible and not np.array_equal(got, scores):
        raise AssertionError("a modified file was accepted and scores differently")
    if not np.isfinite(got).all():
        raise AssertionError("an accepted file gives non-finite scores")
    return "ok"


CASES = {"image": image_case, "archive": archive_case, "special": special_case, "model": model_case}


def main() -> None:
    kind, first, count, cap_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import warnings

    warnings.simplefilter("ignore")
    import dn2  # noqa: F401 - imported before the baseline is taken

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(first, first + count):
            print(json.dumps({"event": "start", "kind": kind, "seed": seed}), flush=True)
            start = time.perf_counter()
            try:
                outcome, detail = CASES[kind](seed, Path(tmp)), ""
            except Exception as e:  # noqa: BLE001 - reported to the parent as a bug
                outcome, detail = "bug", f"{type(e).__name__}: {e}"[:500]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - baseline
            if peak > cap_mb:
                outcome, detail = "bug", f"peak memory {peak} MB above the worker's baseline (cap {cap_mb} MB)"
            print(json.dumps({"event": "done", "kind": kind, "seed": seed, "outcome": outcome, "detail": detail,
                              "peak_mb": peak, "seconds": round(time.perf_counter() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
