"""The service's settings: where it listens, who may call it, and how much one request may cost.

Every limit has a default that suits an inspection line or a lab (and is documented here, in
``dn2 serve --help`` and in the README); each can be changed on the command line. The pixels one
image may decode to are bounded by ``dn2.config`` ``image_memory`` (``--image-memory``), the same
guard every other input of dn2 goes through (:func:`dn2.images.open_image`).

Example:
    >>> settings = ServeSettings(max_images=8)
    >>> settings.max_images, settings.explain
    (8, 3)
    >>> check_listen("0.0.0.0", token=None, insecure=False)
    Traceback (most recent call last):
    ...
    ValueError: refusing to listen on 0.0.0.0 without a token: ...
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..params import Constraint, Interval, Predicate, validate

__all__ = ["ServeSettings", "check_listen", "is_loopback"]


def _token(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) >= 16 and value.isprintable() and value.strip() == value)


@dataclass(frozen=True)
class ServeSettings:
    """How the service behaves; the defaults are safe on a shared machine.

    token: bearer token every endpoint but ``/healthz`` and the page's own files requires
        (``Authorization: Bearer <token>``); ``None``: no authentication (loopback only, unless
        the operator says ``--insecure``). At least 16 printable characters.
    max_file_bytes: largest image file in an upload; a larger file fails alone (its result has an
        ``error``), the others are scored. Counted while the body streams in, never buffered past it.
    max_request_bytes: largest request body; past it the upload is cut off with 413, whatever the
        declared Content-Length said.
    max_images: images (file parts) per request; one more is a 413.
    explain: nearest normal images per result when the request does not say; ``max_explain`` caps
        what a request may ask for.
    request_timeout: seconds a request may take from its first byte to its answer (a slow upload
        gets 408, a server too busy to score it in time 503).
    batch_wait_ms: how long the inference thread waits for more images from other requests before
        it runs a batch (micro-batching: a few ms of latency for batch throughput under load).
    max_batch: images per network run; ``None``: the runtime's fastest batch size.
    max_pending_images: images queued for the network at most; beyond it requests get 503 at once
        rather than waiting (back-pressure, so that a flood cannot grow memory without bound).
    max_connections: concurrent connections uvicorn accepts before answering 503.
    """

    token: str | None = None
    max_file_bytes: int = 20 * 2**20
    max_request_bytes: int = 100 * 2**20
    max_images: int = 64
    explain: int = 3
    max_explain: int = 20
    request_timeout: float = 60.0
    batch_wait_ms: float = 5.0
    max_batch: int | None = None
    max_pending_images: int = 512
    max_connections: int = 64

    constraints: ClassVar[dict[str, list[Constraint | None]]] = {
        "token": [Predicate(_token, "None or a string of at least 16 printable characters without surrounding spaces")],
        "max_file_bytes": [Interval(int, 1, None)],
        "max_request_bytes": [Interval(int, 1, None)],
        "max_images": [Interval(int, 1, None)],
        "explain": [Interval(int, 0, None)],
        "max_explain": [Interval(int, 0, 1000)],
        "request_timeout": [Interval(float, 0.0, None, closed="neither")],
        "batch_wait_ms": [Interval(float, 0.0, 1000.0)],
        "max_batch": [Interval(int, 1, None), None],
        "max_pending_images": [Interval(int, 1, None)],
        "max_connections": [Interval(int, 1, None)],
    }

    def __post_init__(self) -> None:
        validate("ServeSettings", {k: v for k, v in asdict(self).items()}, self.constraints)
        if self.explain > self.max_explain:
            raise ValueError(f"ServeSettings: explain={self.explain} exceeds max_explain={self.max_explain}")
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError("ServeSettings: max_file_bytes exceeds max_request_bytes")

    def __repr__(self) -> str:  # never print the token
        shown = {k: ("***" if k == "token" and v else v) for k, v in asdict(self).items()}
        return f"ServeSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def check_listen(host: str, *, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless the operator said ``insecure``."""
    if not is_loopback(host) and token is None and not insecure:
        raise ValueError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                         "service; pass --token-file FILE (or --token), or --insecure if this network is trusted")

