"""``dn2 serve``: the models as a network service (FastAPI + uvicorn) and a review page; the ``serve`` extra.

Install with ``pip install "dn2[serve]"``. :func:`create_app` builds the ASGI app (testable without a
server, e.g. with FastAPI's ``TestClient``); ``dn2 serve MODEL ...`` runs it under uvicorn on
127.0.0.1:8000. The parts, one concern each:

- :mod:`~dn2.serve.settings`: :class:`ServeSettings` (limits, token) and the listening rule;
- :mod:`~dn2.serve.models`: loading the models once, their names and public description;
- :mod:`~dn2.serve.uploads`: reading multipart uploads within limits while they stream;
- :mod:`~dn2.serve.batcher`: micro-batching the requests' images through one inference thread;
- :mod:`~dn2.serve.metrics`: Prometheus text metrics;
- :mod:`~dn2.serve.schemas`: the JSON answers (pydantic, for the OpenAPI schema);
- :mod:`~dn2.serve.app`: the endpoints; :mod:`~dn2.serve.server`: uvicorn.

Example:
    >>> from dn2.serve import ServeSettings
    >>> ServeSettings(token="a-long-enough-secret-token")
    ServeSettings(token='***', ...)
"""

from .app import create_app
from .models import ServedModel, load_models
from .server import run
from .settings import ServeSettings, check_listen, is_loopback

__all__ = ["ServeSettings", "ServedModel", "check_listen", "create_app", "is_loopback", "load_models", "run"]
