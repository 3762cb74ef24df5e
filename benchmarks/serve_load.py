"""Throughput and latency of ``dn2 serve`` under concurrent clients, beside ``dn2 score`` on the same images.

Starts ``dn2 serve MODEL`` on a free port of 127.0.0.1 (loopback only), runs ``--clients`` client
threads for ``--seconds`` (each request carries ``--per-request`` images), and prints a markdown table:
the service's images/s, request latency p50/p99 and mean micro-batch size, against ``dn2 score``
on the same images (the whole command, and its steady state: embedding + scoring in one process
after a warm-up). Without ``--model``/``--images`` it makes a synthetic set (256 px JPEGs) and fits
the default ``best`` preset on it. Requires the serve extra. Not run in CI; figures go to BENCHMARKS.md
only from a quiet machine.

    python benchmarks/serve_load.py                       # 30 s, 16 clients, synthetic images
    python benchmarks/serve_load.py --n-images 1024       # a longer dn2 score beside it
    python benchmarks/serve_load.py --model parts.dn2 --images test_images/ --clients 32
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

import dn2  # noqa: E402
from dn2.images import list_image_files  # noqa: E402

HOST = "127.0.0.1"


def synthetic(folder: Path, n: int, seed: int) -> None:
    """``n`` 256 px JPEG images of stripes (the normal kind), with a few blobs among them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:256, 0:256]
    for i in range(n):
        if i % 5 == 4:
            cx, cy = rng.integers(64, 192, 2)
            base = (((x - cx) ** 2 + (y - cy) ** 2) < 64**2).astype(np.float32)
        else:
            base = (np.sin(2 * np.pi * x / (12 + i % 5)) > 0).astype(np.float32)
        rgb = np.stack([base * 200 + 30, base * 90 + 40, base * 40 + 20], -1) + rng.normal(0, 8, (256, 256, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def score_command(model: Path, images: Path) -> float:
    """Wall time of the whole ``dn2 score`` command (start-up, model loading, embedding, scoring)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dn2.cli", "score", str(model), str(images), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def score_steady(model: Path, images: Path) -> float:
    """Seconds ``dn2 score``'s embedding + scoring takes in a warm process (the batch throughput)."""
    m = dn2.load(model, progress=False)
    m.anomaly_score([Image.new("RGB", (64, 64))])
    started = time.perf_counter()
    m.anomaly_score(images)
    return time.perf_counter() - started


def run_load(url: str, files: list[bytes], clients: int, seconds: float, per_request: int) -> tuple[list[float], int, float]:
    """(latencies, errors, wall seconds) of ``clients`` threads posting for ``seconds``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop_at:
                batch = [("files", (f"{(i + j) % len(files)}.jpg", files[(i + j) % len(files)])) for j in range(per_request)]
                i += per_request
                started = time.perf_counter()
                r = c.post("/v1/score", files=batch)
                elapsed = time.perf_counter() - started
                ok = r.status_code == 200 and all(x["error"] is None for x in r.json()["results"])
                with lock:
                    latencies.append(elapsed)
                    errors[0] += not ok

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - started


def mean_batch(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    total = sum(float(x.split()[-1]) for x in lines if x.startswith("dn2_batch_images_sum"))
    count = sum(float(x.split()[-1]) for x in lines if x.startswith("dn2_batch_images_count"))
    return total / count if count else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="model file (default: fit the best preset on synthetic images)")
    p.add_argument("--images", type=Path, help="images to score (default: --n-images synthetic 256 px JPEGs)")
    p.add_argument("--n-images", type=int, default=128, help="synthetic images to score without --images (default 128)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--per-request", type=int, default=1, help="images per request")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dn2-serve-load-"))
    if args.images is None:
        synthetic(work / "images", args.n_images, seed=1)
        args.images = work / "images"
    if args.model is None:
        synthetic(work / "normal", 200, seed=0)
        args.model = dn2.DN2(progress=False).fit(work / "normal").save(work / "model.dn2")
    paths = list_image_files(args.images)
    files = [path.read_bytes() for path in paths]

    print(header(f"dn2 serve under load: {args.clients} clients x {args.seconds:g} s, {args.per_request} image(s) per request"))
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    steady = score_steady(args.model, args.images)
    command = score_command(args.model, args.images)

    port = free_port()
    log = (work / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "dn2.cli", "serve", str(args.model), "--host", HOST, "--port",
                               str(port), "--max-connections", str(max(64, 2 * args.clients))], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        run_load(url, files, args.clients, min(3.0, args.seconds), args.per_request)  # warm the clients and caches
        latencies, errors, wall = run_load(url, files, args.clients, args.seconds, args.per_request)
        batch = mean_batch(url)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    n = len(latencies) * args.per_request
    print("| how | images | seconds | images/s | p50 latency | p99 latency | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| `dn2 score` (whole command) | {len(paths)} | {command:.1f} | {len(paths) / command:.1f} | | | |")
    print(f"| `dn2 score` steady state (in process) | {len(paths)} | {steady:.1f} | {len(paths) / steady:.1f} | | | |")
    print(f"| `dn2 serve`, {args.clients} clients | {n} | {wall:.1f} | {n / wall:.1f} | "
          f"{percentile(latencies, 50) * 1000:.0f} ms | {percentile(latencies, 99) * 1000:.0f} ms | {batch:.1f} |")
    print(f"\nerrors: {errors}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
