"""Helpers for the tests that run ``dn2 serve`` as a real process on 127.0.0.1 (server, load, browser)."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import make_image

HOST = "127.0.0.1"
# uvicorn shuts down gracefully, then re-raises the signal it caught: the process ends "by SIGTERM", as
# service managers expect of a stop; both mean a clean stop.
CLEAN_EXIT = (0, -signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def jpeg(seed: int, kind: str = "stripes", size: int = 256) -> bytes:
    out = io.BytesIO()
    make_image(kind, seed, size).save(out, format="JPEG", quality=90)
    return out.getvalue()


def fit_model(root: Path) -> Path:
    """A small model with thumbnails on 12 stripe images (preset paper: one backbone)."""
    import dn2

    normal = root / "normal"
    normal.mkdir()
    for i in range(12):
        make_image("stripes", i, 96).save(normal / f"n{i:02d}.png")
    return dn2.DN2(preset="paper", progress=False, thumbnails=48).fit(normal).save(root / "parts.dn2")


class Server:
    """``dn2 serve`` in a subprocess on a free loopback port; :meth:`stop` sends SIGTERM (kill if it hangs)."""

    def __init__(self, model: Path, *options: str):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = model.parent / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "dn2.cli", "serve", str(model), "--host", HOST, "--port", str(self.port), *options]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dn2 serve exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dn2 serve did not start: {self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
