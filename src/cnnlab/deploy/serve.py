"""`cnnlab serve`: a trained model over HTTP: a JSON API, a web page at /, OpenAPI docs at /docs.

`create_app` loads the model once and builds the FastAPI application; `serve` runs it with
uvicorn. Concurrent requests share forward passes through `MicroBatcher`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, AsyncIterator

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..errors import CnnlabError, InvalidSetting
from ..images.spec import TTA_MODES
from ..models.classifier import Classifier
from ..models.registry import count_parameters
from ..rundir import RunDir
from .batching import MicroBatcher
from .uploads import (
    FORMATS,
    MAX_IMAGES,
    ApiError,
    PredictJSON,
    Upload,
    body_limit,
    describe,
    describe_errors,
    load_upload,
    read_uploads,
)

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


class ModelInfo(BaseModel):
    name: str = Field(description="name of the run directory")
    architecture: str
    model_args: dict[str, Any]
    parameters: int = Field(description="number of weights")
    num_classes: int
    class_names: list[str]
    in_channels: int
    image_size: list[int] = Field(description="input height and width; images of any size are resized to it")
    mean: list[float] = Field(description="per-channel mean used to normalise inputs (0-1 scale)")
    std: list[float] = Field(description="per-channel standard deviation used to normalise inputs")
    tta: str = Field(description=f"test-time augmentation: one of {', '.join(TTA_MODES)}")
    dataset: str | None = Field(description="the training dataset")
    test_accuracy: float | None = Field(description="top-1 accuracy on the test split, from summary.json")
    train_seconds: float | None = Field(description="training time, from summary.json")
    weights_sha256: str


class Stats(BaseModel):
    requests: int = Field(description="POST /v1/predict requests answered with predictions")
    images: int = Field(description="images classified")
    forward_passes: int = Field(description="model forward passes run; fewer than images when batching helps")
    largest_batch: int
    max_batch: int
    max_wait_ms: float


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    error: str = Field(description="one sentence saying what was wrong")


# --- the model behind the API ------------------------------------------------------------------------

class ModelService:
    """The loaded model and what requests need from it: limits, the micro-batcher, the model card."""

    def __init__(self, run_dir: str | Path, *, max_batch: int, max_wait_ms: float, top_k: int, max_bytes: int,
                 max_pixels: int, device: str):
        self.classifier = Classifier.load(run_dir, device)
        self.info = model_info(Path(run_dir), self.classifier)
        self.batcher = MicroBatcher(self._probabilities, max_batch, max_wait_ms)
        self.top_k, self.max_bytes, self.max_pixels = top_k, max_bytes, max_pixels
        self.requests = 0

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier.logits_of_fitted(images), dim=1).cpu()

    def _prepare(self, uploads: list[Upload]) -> list[torch.Tensor]:
        """Check and decode each upload, fitted to the model's input size (runs in a worker thread)."""
        return [self.classifier.fit(load_upload(upload.data, describe(upload.filename, i), self.max_bytes,
                                                self.max_pixels)) for i, upload in enumerate(uploads, 1)]

    async def predict(self, request: Request, top_k: int | None = None) -> PredictResponse:
        """Read, check and decode the request's images, then classify them in a shared batch;
        a JSON body's top_k takes precedence over the query's."""
        with self.batcher.coming():  # batches being gathered wait for this request's images
            uploads, body_top_k = await read_uploads(request, self.max_bytes)
            images = await run_in_threadpool(self._prepare, uploads)
        outputs = await self.batcher.submit(images)
        self.requests += 1
        k = min(body_top_k or top_k or self.top_k, self.info.num_classes)
        return PredictResponse(model=self.info.name, predictions=[
            ImagePrediction(filename=upload.filename, predictions=self._top(probs, k))
            for upload, probs in zip(uploads, outputs)])

    def _top(self, probs: torch.Tensor, k: int) -> list[ClassScore]:
        values, indices = probs.topk(k)
        return [ClassScore(label=self.classifier.class_names[i], probability=p, index=i)
                for p, i in zip(values.tolist(), indices.tolist())]

    def stats(self) -> Stats:
        s = self.batcher.stats
        return Stats(requests=self.requests, images=s.images, forward_passes=s.forward_passes,
                     largest_batch=s.largest_batch, max_batch=self.batcher.max_batch,
                     max_wait_ms=self.batcher.max_wait * 1000)


def model_info(run_dir: Path, classifier: Classifier) -> ModelInfo:
    """What /v1/model reports: the model card plus the training results in summary.json."""
    card, summary = classifier.card, RunDir(run_dir).read_summary()
    return ModelInfo(
        **{key: value for key, value in card.to_json().items() if key in ModelInfo.model_fields and key != "dataset"},
        name=run_dir.resolve().name, parameters=count_parameters(classifier.model),
        dataset=summary.get("dataset", card.dataset), test_accuracy=summary.get("test_accuracy"),
        train_seconds=summary.get("train_seconds"))


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

def get_service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong API key (when the server has one)"},
    413: {"model": ErrorBody, "description": "request body, image file or image area over the limits"},
    415: {"model": ErrorBody, "description": "not an image in a supported format, or an unsupported Content-Type"},
    422: {"model": ErrorBody, "description": "no images, bad base64, bad JSON or a bad parameter"},
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


@api.post("/predict", tags=["model"], summary="Classify one or more images",
          openapi_extra={"requestBody": PREDICT_BODY}, responses={k: ERRORS[k] for k in (413, 415, 422)})
async def predict(request: Request, service: Service,
                  top_k: Annotated[int | None, Query(ge=1, description="classes per image (default: the server's "
                                                     "--top-k); a JSON body's top_k takes precedence")] = None,
                  ) -> PredictResponse:
    """Send image files as multipart/form-data (field `files`, repeated for several images) or JSON
    `{"images": ["<base64>", ...], "top_k": 3}`. Each image gets its top-k classes, most probable first."""
    return await service.predict(request, top_k)


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
    return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


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

def create_app(run_dir: str | Path, *, max_batch: int = 64, max_wait_ms: float = 5.0, api_key: str | None = None,
               top_k: int = 5, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000,
               device: str = "cpu") -> FastAPI:
    """The FastAPI application serving the model in `run_dir` (loaded now: a bad run directory is a
    CnnlabError here, before any server starts). api_key None means $CNNLAB_API_KEY, if set."""
    _check_settings(max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k, max_bytes=max_bytes,
                    max_pixels=max_pixels)
    service = ModelService(run_dir, max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k,
                           max_bytes=max_bytes, max_pixels=max_pixels, device=device)
    key = (api_key if api_key is not None else os.environ.get(API_KEY_ENV)) or None
    limit = body_limit(max_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title=f"cnnlab: {service.info.name}", version=__version__, lifespan=lifespan,
                  description=f"A {service.info.architecture} image classifier ({service.info.num_classes} classes). "
                              f"Up to {MAX_IMAGES} images per request, each at most {max_bytes:,} bytes and "
                              f"{max_pixels:,} pixels. Errors are JSON: {{\"error\": \"...\"}}.")
    app.state.service, app.state.api_key, app.state.body_limit = service, key, limit
    app.state.page = _read_page()
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(ContentLengthLimit, limit=limit)
    app.include_router(pages)
    app.include_router(api, dependencies=[Depends(require_api_key)] if key else [], max_body_size=limit)
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
          **options: Any) -> None:
    """Serve the model in `run_dir` at http://host:port/ until interrupted; options as for `create_app`.
    access_log: one log line per request (off by default: at hundreds of requests/s it costs CPU)."""
    app = create_app(run_dir, **options)
    sock = _listen(host, port)
    address, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{address}]' if ':' in address else address}:{bound_port}/"
    card = app.state.service.info
    print(f"cnnlab: serving {card.name} ({card.architecture}, {card.num_classes} classes) at {url} "
          f"(API docs at {url}docs{'; API key required' if app.state.api_key else ''})", flush=True)
    if not ipaddress.ip_address(address).is_loopback and not app.state.api_key:
        print(f"cnnlab: warning: {host} is reachable from other machines and no API key is set", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log)).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a port in use is a one-line CnnlabError, not a log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise CnnlabError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
