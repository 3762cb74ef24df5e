"""The ASGI application of ``dn2 serve``: the JSON API, the review page, metrics; secure by default.

Endpoints (the OpenAPI schema at ``/openapi.json`` is their reference):

- ``POST /v1/score``: images in (multipart, field ``files``; optional ``model``, ``explain``), one
  verdict record per image out (:mod:`dn2.review.results`);
- ``GET /v1/models``, ``GET /v1/thumbnails/{model}/{index}`` (a training thumbnail recorded in the
  model file at fit time, by its integer index: never a path), ``GET /metrics`` (Prometheus),
  ``GET /healthz`` (open), ``GET /`` and ``/static/*`` (the page: fixed files from the package, open).

Every endpoint but ``/healthz`` and the page's files needs ``Authorization: Bearer <token>`` when a
token is set (compared in constant time). Requests are bounded while they stream in
(:mod:`~dn2.serve.uploads`), decoded in request threads within ``dn2.config`` ``image_memory``
(:func:`dn2.images.open_image`: content sniffed, extension and Content-Type ignored), and scored
by one inference thread in micro-batches (:mod:`~dn2.serve.batcher`).

Example:
    >>> from dn2.serve import create_app, load_models
    >>> app = create_app(load_models(["parts.dn2"]))  # doctest: +SKIP
    >>> from fastapi.testclient import TestClient      # doctest: +SKIP
    >>> with TestClient(app) as client:                # doctest: +SKIP
    ...     client.post("/v1/score", files=[("files", open("a.png", "rb"))]).json()
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..images import BadImageError, open_image
from ..review import ASSETS, asset, error_record, media_type, overlay_url, record
from .batcher import Busy, MicroBatcher
from .metrics import Metrics
from .models import NAME_PATTERN, ServedModel, load_models
from .schemas import Health, Models, Problem, ScoreResponse
from .settings import ServeSettings
from .uploads import UploadError, UploadedFile, UploadReader

__all__ = ["create_app"]

#: The page loads only its own files; images may be data: and blob: URLs (uploads, fetched thumbnails).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one or more images (JPEG, PNG, GIF, BMP, TIFF, WebP, PPM/PGM: recognised by "
                                 "their content; the file name is only a label)"},
        "model": {"type": "string", "description": "which loaded model scores them (default: the first one served)"},
        "explain": {"type": "integer", "minimum": 0, "default": 3,
                    "description": "nearest normal training images returned per image"},
    }}}}}}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "malformed request", 401: "missing or wrong bearer token", 404: "no such model or thumbnail",
            408: "the upload did not arrive within --request-timeout", 413: "over a size or count limit",
            415: "not multipart/form-data", 422: "invalid parameter",
            503: "busy: too many images waiting, or not scored within --request-timeout"}
    return {code: {"model": Problem, "description": what[code]} for code in codes}


class _Observe:
    """ASGI middleware: security headers on every response, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        self.metrics.begin()

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in _SECURITY_HEADERS:
                    headers.setdefault(key.decode(), value.decode())
                headers.setdefault("cache-control", "no-store")
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            self.metrics.request(getattr(route, "path", "other"), status, time.perf_counter() - started)


def _decode(files: Sequence[UploadedFile], max_side: int) -> list[Image.Image | str]:
    """Each upload as an RGB image, or the reason it cannot be one (runs in a request thread)."""
    out: list[Image.Image | str] = []
    for f in files:
        if f.error is not None:
            out.append(f.error)
            continue
        try:
            out.append(open_image(f.data, name=f.name, max_side=max_side))
        except BadImageError as e:
            out.append(str(e))
    return out


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def create_app(models: dict[str, ServedModel] | Sequence[str | os.PathLike], *,
               settings: ServeSettings | None = None, warm_up: bool = True) -> FastAPI:
    """The service for ``models`` (from :func:`~dn2.serve.load_models`, or model file paths / ``NAME=PATH``).

    The first model is the default of ``POST /v1/score``. ``warm_up`` runs each model once at start,
    so the first request does not wait for the network to be compiled.
    """
    settings = settings or ServeSettings()
    if not isinstance(models, dict):
        models = load_models([os.fspath(m) for m in models])
    default_model = next(iter(models))
    metrics = Metrics(models)
    batcher = MicroBatcher(models, batch_wait_ms=settings.batch_wait_ms, max_batch=settings.max_batch,
                           max_pending_images=settings.max_pending_images, on_batch=metrics.batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warm_up:
            await run_in_threadpool(batcher.warm_up)
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)  # in-flight requests have finished: uvicorn waited for them

    app = FastAPI(
        title="dn2", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
        description="Image anomaly detection by nearest neighbours on pretrained CNN features (DN2). Upload images "
                    "to `POST /v1/score`: each gets an anomaly score, a verdict against the model's threshold, the "
                    "nearest normal training images that explain it, and a heat map where the model makes maps. "
                    "When the server has a token, send `Authorization: Bearer <token>` (all but `/healthz`).",
    )
    app.state.models, app.state.settings, app.state.metrics, app.state.batcher = models, settings, metrics, batcher
    app.add_middleware(_Observe, metrics=metrics)
    bearer = HTTPBearer(auto_error=False, description="the token dn2 serve was started with (--token-file)")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), settings.token.encode("utf-8")):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorised)]

    @app.exception_handler(UploadError)
    async def upload_refused(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    async def read_upload(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise UploadError(413, f"request body larger than {settings.max_request_bytes} bytes (--max-request-mb)")
        reader = UploadReader(request.headers.get("content-type"), max_file_bytes=settings.max_file_bytes,
                              max_request_bytes=settings.max_request_bytes, max_images=settings.max_images)
        async for chunk in request.stream():
            reader.feed(chunk)
        return reader.finish()

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, openapi_extra=_UPLOAD_BODY,
              responses=_problems(400, 401, 404, 408, 413, 415, 422, 503), summary="Score images",
              description="Score one or many images. A file that cannot be used (unreadable, not an image, too "
                          "large) gets an `error` in its own result; the others are scored.")
    async def score(request: Request) -> dict[str, Any]:
        deadline = time.monotonic() + settings.request_timeout
        try:
            upload = await asyncio.wait_for(read_upload(request), _remaining(deadline))
        except asyncio.TimeoutError:
            raise UploadError(408, f"the upload took longer than {settings.request_timeout:g} s (--request-timeout)") from None
        name = upload.fields.get("model") or default_model
        served = models.get(name)
        if served is None:
            raise HTTPException(404, f"no model {name[:64]!r}; loaded: {', '.join(models)}")
        explain_text = upload.fields.get("explain", str(settings.explain))
        if not explain_text.isdigit() or int(explain_text) > settings.max_explain:
            raise HTTPException(422, f"explain must be an integer from 0 to {settings.max_explain}, got {explain_text[:8]!r}")
        explain = int(explain_text)
        decoded = await run_in_threadpool(_decode, upload.files, served.max_side)
        images = [d for d in decoded if isinstance(d, Image.Image)]
        scored = None
        if images:
            try:
                scored = await asyncio.wait_for(batcher.score(served.name, images, explain), _remaining(deadline))
            except Busy as e:
                raise HTTPException(503, f"busy: {e}; try again shortly", headers={"Retry-After": "1"}) from None
            except asyncio.TimeoutError:
                raise HTTPException(503, f"not scored within {settings.request_timeout:g} s (--request-timeout): "
                                         "the server is busy", headers={"Retry-After": "1"}) from None
        metrics.images(served.name, scored=len(images), refused=len(decoded) - len(images))
        root = request.scope.get("root_path", "")
        thumbs = getattr(served.model, "thumbnails_", None)

        def thumbnail(row: int) -> str | None:
            return f"{root}/v1/thumbnails/{quote(served.name)}/{row}" if thumbs is not None else None

        def records() -> list[dict[str, Any]]:
            out, i = [], 0
            for f, d in zip(upload.files, decoded):
                if isinstance(d, str):
                    out.append(error_record(f.name, d))
                    continue
                heatmap = overlay_url(served.model, d, scored.maps[i]) if scored.maps else None
                out.append(record(f.name, scored.verdicts, i, served.model.detector, thumbnail=thumbnail, heatmap=heatmap))
                i += 1
            return out

        results = await run_in_threadpool(records) if scored is not None and scored.maps else records()
        return {"model": served.name, "results": results}

    @app.get("/v1/models", response_model=Models, dependencies=auth, responses=_problems(401),
             summary="The loaded models")
    async def list_models() -> dict[str, Any]:
        return {"dn2_version": __version__, "models": [m.info() for m in models.values()]}

    @app.get("/v1/thumbnails/{model}/{index}", dependencies=auth, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "the JPEG recorded at fit time"},
                        **_problems(401, 404, 422)},
             summary="A training image's thumbnail",
             description="Thumbnail `index` of the model's memory images (as in `nearest[].thumbnail`), recorded in "
                         "the model file by `dn2 fit --thumbnails`.")
    async def thumbnail(model: str = Path(pattern=NAME_PATTERN.pattern, description="a loaded model's name"),
                        index: int = Path(ge=0, description="the memory image's index")) -> Response:
        served = models.get(model)
        thumbs = getattr(served.model, "thumbnails_", None) if served is not None else None
        if thumbs is None or index >= len(thumbs):
            raise HTTPException(404, "no such thumbnail" if thumbs is not None else f"no model {model!r} with thumbnails")
        return Response(thumbs[index], media_type=thumbs.media_type, headers={"cache-control": "private, max-age=3600"})

    @app.get("/healthz", response_model=Health, summary="Liveness (open, even with a token)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=auth, responses=_problems(401),
             summary="Prometheus metrics (text format 0.0.4)")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(asset("index.html"), media_type=media_type("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in ASSETS or name == "index.html":  # a fixed table: no request path reaches the file system
            raise HTTPException(404, "no such file")
        return Response(asset(name), media_type=media_type(name), headers={"cache-control": "no-cache"})

    return app
