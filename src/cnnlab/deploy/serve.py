"""`cnnlab serve`: a trained model over HTTP: cnnlab's JSON API (/v1), the Open Inference
Protocol (/v2), Prometheus metrics (/metrics), a web page at /, OpenAPI docs at /docs (offline).

`create_app` loads the model once and builds the FastAPI application; `serve` runs it with
uvicorn. Concurrent requests share forward passes through `MicroBatcher`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, AsyncIterator

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..devices import resolve_device
from ..errors import CnnlabError, InvalidSetting
from . import oip
from .metrics import MetricsMiddleware
from .service import ModelInfo, ModelService, Service, Stats
from .uploads import FORMATS, MAX_IMAGES, ApiError, PredictJSON, body_limit, describe_errors, read_uploads

API_KEY_ENV = "CNNLAB_API_KEY"
log = logging.getLogger("cnnlab.serve")


# --- request and response bodies (they document the API at /docs) -------------------------------

class ClassScore(BaseModel):
    label: str = Field(description="class name")
    probability: float = Field(ge=0, le=1, description="softmax probability")
    index: int = Field(description="the class's position in the model's output (and in class_names)")


class ImagePrediction(BaseModel):
    filename: str | None = Field(description="the uploaded file's name; null for base64 images")
    predictions: list[ClassScore] = Field(description="the top-k classes, most probable first")


class PredictResponse(BaseModel):
    model: str = Field(description="name of the run directory the model came from")
    predictions: list[ImagePrediction] = Field(description="one entry per image, in the order sent")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    error: str = Field(description="one sentence saying what was wrong")


# --- API key -------------------------------------------------------------------------------------------

_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


def require_api_key(request: Request, key: Annotated[str | None, Security(_key_header)],
                    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    """Let a request through only with the key, in X-API-Key or as `Authorization: Bearer KEY`."""
    given = key or (bearer.credentials if bearer else None)
    if not given:
        raise ApiError(401, "This server needs an API key: send it in the X-API-Key header.")
    if not secrets.compare_digest(given.encode(), request.app.state.api_key.encode()):
        raise ApiError(401, "The API key is not valid.")


# --- routes ------------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong API key (when the server has one)"},
    413: {"model": ErrorBody, "description": "request body, image file or image area over the limits"},
    415: {"model": ErrorBody, "description": "not an image in a supported format, or an unsupported Content-Type"},
    422: {"model": ErrorBody, "description": "no images, bad base64, bad JSON or a bad parameter"},
    503: {"model": ErrorBody, "description": "--max-queue requests are in progress: retry after the Retry-After "
                                             "header's seconds"},
}
PREDICT_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {"files": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": f"image files ({', '.join(FORMATS)}); the field may also be called 'file'"}}}},
    "application/json": {"schema": PredictJSON.model_json_schema()},
}}
PAGE_HEADERS = {  # the page loads nothing from elsewhere; the policy makes the browser hold it to that
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}

pages = APIRouter()
api = APIRouter(prefix="/v1", responses={401: ERRORS[401]})


@pages.get("/", include_in_schema=False)
def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page, headers=PAGE_HEADERS)


@pages.get("/healthz", tags=["service"], summary="Liveness check (never needs an API key)")
def healthz() -> Health:
    return Health(status="ok")


@pages.get("/metrics", tags=["service"], summary="Prometheus metrics (never needs an API key)")
def metrics(service: Service) -> Response:
    return service.metrics.render()


@api.post("/predict", tags=["model"], summary="Classify one or more images",
          openapi_extra={"requestBody": PREDICT_BODY}, responses={k: ERRORS[k] for k in (413, 415, 422, 503)})
async def predict(request: Request, service: Service,
                  top_k: Annotated[int | None, Query(ge=1, description="classes per image (default: the server's "
                                                     "--top-k); a JSON body's top_k takes precedence")] = None,
                  ) -> PredictResponse:
    """Send image files as multipart/form-data (field `files`, repeated for several images) or JSON
    `{"images": ["<base64>", ...], "top_k": 3}`. Each image gets its top-k classes, most probable first."""
    with service.admit():  # its place is held until the answer: reading, decoding and waiting for the model
        with service.batcher.coming():  # batches being gathered wait for this request's images
            uploads, body_top_k = await read_uploads(request, service.max_bytes)
            images = await service.decode(uploads)
        outputs = await service.classify(images)
    k = min(body_top_k or top_k or service.top_k, service.info.num_classes)
    return PredictResponse(model=service.info.name, predictions=[
        ImagePrediction(filename=upload.filename, predictions=_top(service, probs, k))
        for upload, probs in zip(uploads, outputs)])


def _top(service: ModelService, probs: Any, k: int) -> list[ClassScore]:
    values, indices = probs.topk(k)
    return [ClassScore(label=service.classifier.class_names[i], probability=p, index=i)
            for p, i in zip(values.tolist(), indices.tolist())]


@api.get("/model", tags=["model"], summary="The model card: architecture, classes, preprocessing, test accuracy")
def describe_model(service: Service) -> ModelInfo:
    return service.info


@api.get("/stats", tags=["service"], summary="Request, image and forward-pass counters")
def get_stats(service: Service) -> Stats:
    return service.stats()


# --- errors: always {"error": "<one sentence>"} --------------------------------------------------------

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    messages = {
        404: f"Nothing at {request.url.path}; the API is described at /docs.",
        405: f"{request.method} is not allowed on {request.url.path}.",
        413: f"The request body is over the {request.app.state.body_limit:,}-byte limit.",
    }
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, describe_errors(exc.errors()))


class ContentLengthLimit:
    """Answer a request that announces a body over the limit with a JSON 413, before reading any of it.

    FastAPI's max_body_size (set on the API routes) counts streamed bodies too, but answers an
    oversized Content-Length in plain text; this runs first so every error stays JSON."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if length.isdigit() and int(length) > self.limit:
            response = _error(413, f"The request body is over the {self.limit:,}-byte limit.")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # uvicorn logs the traceback; the client gets no internals
    return _error(500, "Internal server error; the server's log has the details.")


# --- the application -----------------------------------------------------------------------------------

MAX_QUEUE = 256  # requests in progress before 503s: 16x the 16 clients that saturate 2 cores (cli.py shows it)


def create_app(run_dir: str | Path, *, max_batch: int = 64, max_wait_ms: float = 5.0, api_key: str | None = None,
               top_k: int = 5, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000,
               max_queue: int = MAX_QUEUE, device: str = "cpu", engine: str = "auto") -> FastAPI:
    """The FastAPI application serving the model in `run_dir` (loaded now: a bad run directory is a
    CnnlabError here, before any server starts). api_key None means $CNNLAB_API_KEY, if set.
    max_queue: classification requests in progress (being read, decoded, waiting or computed) beyond
    which new ones get 503 with Retry-After. engine: one of deploy.ENGINES (deploy/engine.py)."""
    _check_settings(max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k, max_bytes=max_bytes,
                    max_pixels=max_pixels, max_queue=max_queue)
    service = ModelService(run_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k,
                           max_bytes=max_bytes, max_pixels=max_pixels, max_queue=max_queue,
                           device=str(resolve_device(device)), engine=engine)
    key = (api_key if api_key is not None else os.environ.get(API_KEY_ENV)) or None
    limit = body_limit(max_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        service.accepting = True
        yield
        service.accepting = False
        await service.batcher.stop()

    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from the app itself, not from a CDN, so the
    # docs render on a machine without internet. No /redoc: ReDoc still fetches its logo from a CDN.
    app = FastAPIOffline(redoc_url=None, title=f"cnnlab: {service.info.name}", version=__version__, lifespan=lifespan,
                         description=f"A {service.info.architecture} image classifier ({service.info.num_classes} "
                                     f"classes). Up to {MAX_IMAGES} images per request, each at most {max_bytes:,} "
                                     f"bytes and {max_pixels:,} pixels. Errors are JSON: {{\"error\": \"...\"}}. "
                                     f"The Open Inference Protocol v2 serves it as model {service.info.name!r}.")
    app.state.service, app.state.api_key, app.state.body_limit = service, key, limit
    app.state.page = _read_page()
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(ContentLengthLimit, limit=limit)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: it sees every answer
    app.include_router(pages)
    guard = [Depends(require_api_key)] if key else []
    app.include_router(api, dependencies=guard, max_body_size=limit)
    app.include_router(oip.router, dependencies=guard, max_body_size=limit, responses={401: ERRORS[401]})
    return app


def _check_settings(**settings: float) -> None:
    for name, value in settings.items():
        lowest = 0 if name == "max_wait_ms" else 1
        if value < lowest:
            raise InvalidSetting(name, f"must be at least {lowest}, got {value}.")


def _read_page() -> str:
    page = resources.files(__package__).joinpath("static", "index.html")
    try:
        return page.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CnnlabError(f"The web page {page} is missing from the cnnlab installation.") from None


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          shutdown_timeout: float = 30.0, **options: Any) -> None:
    """Serve the model in `run_dir` at http://host:port/ until interrupted; options as for `create_app`.
    access_log: one log line per request (off by default: at hundreds of requests/s it costs CPU).
    SIGTERM (what Kubernetes, systemd and Docker send) stops it gracefully: no new connections,
    requests in progress answered (for at most shutdown_timeout seconds), then a normal return."""
    app = create_app(run_dir, **options)
    sock = _listen(host, port)
    address, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{address}]' if ':' in address else address}:{bound_port}/"
    service = app.state.service
    card = service.info
    if service.engine_note:
        print(f"cnnlab: serving with PyTorch: {service.engine_note}", flush=True)
    print(f"cnnlab: serving {card.name} ({card.architecture}, {card.num_classes} classes, {card.engine}) at {url} "
          f"(API docs at {url}docs{'; API key required' if app.state.api_key else ''})", flush=True)
    if not ipaddress.ip_address(address).is_loopback and not app.state.api_key:
        print(f"cnnlab: warning: {host} is reachable from other machines and no API key is set", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log,
                                           timeout_graceful_shutdown=shutdown_timeout))
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler that was
    # in place before it: this one notes it, so a requested stop ends with exit status 0, not 143
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        stats = service.stats()
        print(f"cnnlab: stopped on SIGTERM after answering {stats.requests:,} classification "
              f"request{'' if stats.requests == 1 else 's'}", flush=True)


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a port in use is a one-line CnnlabError, not a log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise CnnlabError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
