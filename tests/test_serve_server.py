"""dn2 serve as a real uvicorn process on 127.0.0.1: a bounded load test, slow and lying uploads, graceful SIGTERM.

Traffic goes only to the loopback address of this machine; every loop is bounded in count and time.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serving import CLEAN_EXIT, HOST, Server, fit_model, jpeg  # noqa: E402

LOAD_CLIENTS, LOAD_SECONDS, LOAD_MAX_REQUESTS = 16, 6.0, 400


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return fit_model(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def server(model_file):
    s = Server(model_file, "--request-timeout", "3")
    yield s
    assert s.stop() in CLEAN_EXIT


def test_load_of_concurrent_clients_is_served_without_errors(server):
    images = [jpeg(i, "stripes" if i % 4 else "blob") for i in range(8)]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(LOAD_MAX_REQUESTS // LOAD_CLIENTS):
                if time.monotonic() > stop_at:
                    return
                started = time.perf_counter()
                r = c.post("/v1/score", files=[("files", (f"{k}-{i}.jpg", images[(k + i) % 8]))])
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if r.status_code != 200 or r.json()["results"][0]["error"] is not None:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"\nserve load: {LOAD_CLIENTS} clients, {len(latencies)} requests in {wall:.1f} s: "
          f"{len(latencies) / wall:.1f} images/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {len(failures)} errors")
    assert failures == []
    assert len(latencies) >= LOAD_CLIENTS
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = [line for line in metrics.splitlines() if line.startswith('dn2_batch_images_count{model="parts"}')]
    assert int(batches[0].split()[-1]) < len(latencies)  # requests were batched together


def _raw(server, request: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes or ``wait`` passes."""
    with socket.create_connection((HOST, server.port), timeout=wait) as s:
        s.sendall(request)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def _multipart(body_tail: bytes = b"") -> bytes:
    return (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n" + jpeg(1) + body_tail)


def test_a_slow_upload_gets_408_after_the_request_timeout(server):
    body = _multipart()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body) + 1000}\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    answer = _raw(server, head + body, wait=10)  # 1000 promised bytes never come
    assert answer.startswith(b"HTTP/1.1 408") and b"--request-timeout" in answer
    assert 2.5 < time.monotonic() - started < 9


def test_a_lying_content_length_gets_no_further_than_it_says(server):
    body = _multipart(b"\r\n--b--\r\n")
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: 200\r\nConnection: close\r\n\r\n").encode()
    answer = _raw(server, head + body)
    assert answer.startswith(b"HTTP/1.1 400") and b"ends before its closing boundary" in answer
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def _in_flight(server) -> int:
    line = next(x for x in httpx.get(f"{server.url}/metrics").text.splitlines() if x.startswith("dn2_requests_in_flight "))
    return int(line.split()[1]) - 1  # less the metrics request itself


def test_sigterm_lets_the_request_in_flight_finish(model_file):
    server = Server(model_file, "--max-images", "64")
    files = [("files", (f"{i}.jpg", jpeg(i, size=320))) for i in range(48)]
    answer: dict[str, object] = {}

    def post() -> None:
        try:
            answer["response"] = httpx.post(f"{server.url}/v1/score", files=files, timeout=120)
        except httpx.HTTPError as e:
            answer["error"] = e

    thread = threading.Thread(target=post)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while _in_flight(server) < 1 and time.monotonic() < deadline:  # until the upload is inside the server
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    assert "error" not in answer, answer.get("error")
    response = answer["response"]
    assert response.status_code == 200 and len(response.json()["results"]) == 48
    assert all(r["error"] is None for r in response.json()["results"])
    assert code in CLEAN_EXIT
    log = server.log.read_text()
    assert "Waiting for connections to close" in log or "Shutting down" in log
    assert "Finished server process" in log and "Traceback" not in log
