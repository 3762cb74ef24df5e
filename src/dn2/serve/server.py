"""Running the app under uvicorn: one process, graceful shutdown on SIGTERM and Ctrl-C.

uvicorn stops accepting connections on SIGTERM/SIGINT, lets the requests in flight finish (up to
``request_timeout`` + a few seconds), then runs the app's shutdown, which lets the inference thread
finish what it has queued. One process only: the model is loaded once and the network runs in one
place (several workers would each load it and fight over the cores).
"""

from __future__ import annotations

from typing import Any

from .settings import ServeSettings

__all__ = ["run"]

_GRACE = 5.0  # seconds beyond the request timeout that a shutdown waits for requests in flight


def run(app: Any, *, host: str, port: int, settings: ServeSettings, log_level: str = "info") -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or Ctrl-C (then shut down gracefully)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, workers=1, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=int(settings.request_timeout + _GRACE), server_header=False,
        proxy_headers=False, access_log=log_level == "debug",
    )
    uvicorn.Server(config).run()
