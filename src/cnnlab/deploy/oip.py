"""The Open Inference Protocol v2 (KServe v2) over REST, beside cnnlab's own /v1 API: what
KServe, Seldon/MLServer, Triton's clients and gateways that speak the protocol call.

Health, server and model metadata, model readiness and inference, plus the binary tensor data
extension (raw tensors after the JSON header), which Triton's client libraries use by default.
A request carries one input: encoded image files as BYTES (base64 strings in JSON, raw bytes in
binary), or a UINT8 (0-255) or FP32 (0-1) tensor of the model's shape, (N, H, W, C) or
(N, C, H, W). The answer holds the softmax probabilities and the top-k class names.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .service import ModelService, Service
from .uploads import MAX_IMAGES, ApiError, Upload, decode_base64, describe_errors

VERSION = "1"  # a run directory holds one model: its only version
IMAGES, PIXELS = "images", "pixels"  # the inputs the metadata lists (any name is taken, by datatype)
PROBABILITIES, LABELS = "probabilities", "labels"
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension's split between JSON and tensors
DTYPES = {"UINT8": np.uint8, "FP32": np.float32}  # the pixel tensors taken
PLATFORMS = {"torch": "pytorch", "onnxruntime": "onnxruntime_onnx"}  # model metadata's platform, by engine


# --- request and response bodies (they document the routes at /docs) ---------------------------------

class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when sent as binary")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"top_k": K}: class names per image (default: '
                                              'the server\'s --top-k); binary_data_output as the extension says')
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = Field(None, description=f"{PROBABILITIES} and/or {LABELS} (default: both)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


# --- routes --------------------------------------------------------------------------------------

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])


@router.get("", summary="Server metadata")
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="cnnlab", version=__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", summary="The server is running")
def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", summary="The server is ready for inference")
def ready(service: Service) -> Ready:
    return Ready(ready=service.accepting)


@router.get("/models/{name}", summary="Model metadata: inputs, outputs, datatypes and shapes")
@router.get("/models/{name}/versions/{version}", summary="Model metadata", include_in_schema=False)
def model_metadata(name: str, service: Service, version: str = VERSION) -> ModelMetadata:
    _check_model(service, name, version)
    c, (h, w) = service.classifier.in_channels, service.classifier.image_size
    return ModelMetadata(name=service.info.name, versions=[VERSION], platform=PLATFORMS[service.engine.name], inputs=[
        TensorMetadata(name=IMAGES, datatype="BYTES", shape=[-1]),
        TensorMetadata(name=PIXELS, datatype="UINT8", shape=[-1, h, w, c]),
    ], outputs=[
        TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, service.info.num_classes]),
        TensorMetadata(name=LABELS, datatype="BYTES", shape=[-1, -1]),
    ])


@router.get("/models/{name}/ready", summary="The model is ready for inference")
@router.get("/models/{name}/versions/{version}/ready", summary="The model is ready", include_in_schema=False)
def model_ready(name: str, service: Service, version: str = VERSION) -> ModelReady:
    _check_model(service, name, version)
    return ModelReady(name=service.info.name, ready=service.accepting)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs written in place: OpenAPI documents (and ReDoc) have no
    $defs of their own, so the references would point nowhere."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node
    return resolve(schema)


INFER_BODY = {"required": True, "content": {
    "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            f"the binary tensor data extension: the JSON request, then the "
                                            f"tensors, with the JSON's length in the {HEADER_LENGTH} header"}},
}}


@router.post("/models/{name}/infer", summary="Classify images", response_model=InferenceResponse,
             openapi_extra={"requestBody": INFER_BODY})
@router.post("/models/{name}/versions/{version}/infer", summary="Classify images", include_in_schema=False)
async def infer(name: str, request: Request, service: Service, version: str = VERSION) -> Response:
    """One input: `images` (BYTES: encoded image files, base64 in JSON) or `pixels` (UINT8 0-255, or
    FP32 0-1, shaped (N, H, W, C) or (N, C, H, W) at the model's size). Outputs: `probabilities`
    (FP32, N x classes) and `labels` (BYTES, N x top_k class names, most probable first)."""
    _check_model(service, name, version)
    with service.admit():
        with service.batcher.coming():
            body = await request.body()
            infer_request, binary = _parse(body, request.headers.get(HEADER_LENGTH))
            try:
                images = await run_in_threadpool(_images, service, infer_request.inputs[0], binary)
            except ApiError as exc:  # the protocol answers a malformed request with 400 where /v1 says 422
                raise ApiError(400 if exc.status == 422 else exc.status, exc.message) from None
        probabilities = torch.stack(await service.classify(images))
    return _answer(service, infer_request, probabilities)


def _check_model(service: ModelService, name: str, version: str) -> None:
    if name != service.info.name:
        raise ApiError(404, f"No model named {name!r}: this server serves {service.info.name!r}.")
    if version != VERSION:
        raise ApiError(404, f"Model {name!r} has no version {version!r}: its only version is {VERSION!r}.")


# --- reading a request ---------------------------------------------------------------------------

def _parse(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON request, and the binary tensor data after it (empty without the extension)."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"The {HEADER_LENGTH} header ({header_length!r}) is not a length "
                                f"within the {len(body):,}-byte body.")
        split = int(header_length)
    try:
        return InferenceRequest.model_validate_json(body[:split]), body[split:]
    except ValidationError as exc:
        raise ApiError(400, describe_errors(exc.errors())) from None


def _images(service: ModelService, tensor: RequestInput, binary: bytes) -> list[torch.Tensor]:
    """The request's images as uint8 (C, H, W) at the model's size (runs in a worker thread)."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise ApiError(400, f"Input {tensor.name!r} announces {size} bytes of binary data; {len(binary):,} follow "
                            "the JSON header.")
    if (size is None) == (tensor.data is None):
        raise ApiError(400, f"Input {tensor.name!r} needs its tensor either as 'data' in the JSON or as binary "
                            "data after it (binary_data_size), not " + ("both." if size is not None else "neither."))
    count = math.prod(tensor.shape) if tensor.shape and all(d >= 0 for d in tensor.shape) else -1
    if tensor.datatype == "BYTES":
        if count < 1 or count > MAX_IMAGES:
            raise ApiError(400, f"Input {tensor.name!r} has shape {tensor.shape}: send 1 to {MAX_IMAGES} encoded "
                                "images, e.g. shape [N].")
        files = _split_bytes(binary, tensor.name) if size is not None else \
            [_base64_element(item, i, service.max_bytes) for i, item in enumerate(_flat(tensor.data), 1)]
        if len(files) != count:
            raise ApiError(400, f"Input {tensor.name!r} has shape {tensor.shape} but holds {len(files)} "
                                f"element{'' if len(files) == 1 else 's'}.")
        return service.prepare([Upload(None, data) for data in files])
    if tensor.datatype in DTYPES:
        return list(_pixels(service, tensor, binary if size is not None else None))
    raise ApiError(400, f"Input {tensor.name!r} has datatype {tensor.datatype}: send BYTES (encoded image files), "
                        "UINT8 (pixels 0-255) or FP32 (pixels 0-1).")


def _flat(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item) if isinstance(item, list) else [item])
    return out


def _base64_element(item: Any, position: int, max_bytes: int) -> bytes:
    if not isinstance(item, str):
        raise ApiError(400, f"Element {position} of the BYTES input is not a string: send each image file "
                            "base64-encoded.")
    return decode_base64(item, f"image {position}", max_bytes)


def _split_bytes(binary: bytes, name: str) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then its bytes."""
    items, at = [], 0
    while at < len(binary):
        if at + 4 > len(binary):
            raise ApiError(400, f"The binary data of input {name!r} ends inside an element's length.")
        (length,) = struct.unpack_from("<I", binary, at)
        if at + 4 + length > len(binary):
            raise ApiError(400, f"The binary data of input {name!r} ends inside element {len(items) + 1}.")
        items.append(binary[at + 4:at + 4 + length])
        at += 4 + length
    return items


def _pixels(service: ModelService, tensor: RequestInput, binary: bytes | None) -> torch.Tensor:
    """A UINT8 or FP32 tensor of the model's shape, NHWC or NCHW, as uint8 (N, C, H, W)."""
    c, (h, w) = service.classifier.in_channels, service.classifier.image_size
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1:] not in ([h, w, c], [c, h, w]) or not 1 <= shape[0] <= MAX_IMAGES:
        raise ApiError(400, f"Input {tensor.name!r} has shape {shape}; this model takes [N, {h}, {w}, {c}] or "
                            f"[N, {c}, {h}, {w}] with N from 1 to {MAX_IMAGES}.")
    dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
    try:
        array = np.frombuffer(binary, dtype=dtype) if binary is not None else \
            np.asarray(_flat(tensor.data or []), dtype=dtype)
        array = array.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ApiError(400, f"Input {tensor.name!r} does not hold {math.prod(shape):,} {tensor.datatype} values "
                            f"for shape {shape} ({exc}).") from None
    if tensor.datatype == "FP32":  # pixels 0-1, as torchvision's ToTensor gives them, to the 8 bits trained on
        if not np.isfinite(array).all():
            raise ApiError(400, f"Input {tensor.name!r} holds NaN or infinite values.")
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(array))
    return images if shape[1:] == [c, h, w] else images.permute(0, 3, 1, 2)


# --- the answer ------------------------------------------------------------------------------------

def _answer(service: ModelService, request: InferenceRequest, probabilities: torch.Tensor) -> Response:
    params = request.parameters or {}
    top_k = params.get("top_k", service.top_k)
    if not isinstance(top_k, int) or top_k < 1:
        raise ApiError(400, f"The parameter top_k must be a positive whole number, got {top_k!r}.")
    top_k = min(top_k, service.info.num_classes)
    wanted = request.outputs or [RequestOutput(name=PROBABILITIES), RequestOutput(name=LABELS)]
    all_binary = bool(params.get("binary_data_output", False))
    outputs, blobs = [], []
    for requested in wanted:
        binary = bool((requested.parameters or {}).get("binary_data", all_binary))
        if requested.name == PROBABILITIES:
            values = probabilities.float().numpy()
            output = ResponseOutput(name=PROBABILITIES, shape=list(values.shape), datatype="FP32")
            blob = values.astype("<f4").tobytes() if binary else None
            data = None if binary else values.ravel().tolist()
        elif requested.name == LABELS:
            indices = probabilities.topk(top_k, dim=1).indices.tolist()
            names = [[service.classifier.class_names[i] for i in row] for row in indices]
            output = ResponseOutput(name=LABELS, shape=[len(names), top_k], datatype="BYTES")
            blob = b"".join(struct.pack("<I", len(n.encode())) + n.encode() for row in names for n in row) \
                if binary else None
            data = None if binary else [n for row in names for n in row]
        else:
            raise ApiError(400, f"No output named {requested.name!r}: this model has {PROBABILITIES} and {LABELS}.")
        if blob is not None:
            output.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        output.data = data
        outputs.append(output)
    answer = InferenceResponse(model_name=service.info.name, model_version=VERSION, id=request.id, outputs=outputs)
    header = answer.model_dump(exclude_none=True)
    if not blobs:
        return JSONResponse(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})
