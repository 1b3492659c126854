"""The images of a predict request: multipart files or base64 JSON, checked, then decoded.

Every check that can run before decoding does: the byte count first, then the width and
height from the header (Pillow reads it without decoding pixels), so a small file that
claims billions of pixels, a decompression bomb, is refused before it costs any memory.
"""

from __future__ import annotations

import base64
import io
from typing import Any, NamedTuple, Sequence

import torch
from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..images.spec import UnreadableImage
from ..images.tensors import decode_image_bytes

# Formats accepted from the network. Pillow opens more, some through external programs
# (EPS runs Ghostscript), so this list is a safety fence as well as documentation.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG includes camera MPO files
MAX_IMAGES = 64  # per request; with max_bytes it also bounds the request body
EMPTY_BODY = ("The request has no images: send files in the multipart/form-data field 'files', "
              "or JSON {\"images\": [\"<base64>\", ...]}.")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and one sentence saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Upload(NamedTuple):
    """One image as it arrived: its file name (None for base64 JSON) and its encoded bytes."""
    filename: str | None
    data: bytes


class PredictJSON(BaseModel):
    """The JSON form of a predict request."""
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES,
                              description="image files encoded as base64, optionally as data URLs")
    top_k: int | None = Field(None, ge=1, description="classes per image (default: the server's --top-k)")


# --- reading the request -------------------------------------------------------------------------

def body_limit(max_bytes: int) -> int:
    """The largest request body accepted: a full request of base64 images, plus room for framing."""
    return MAX_IMAGES * (4 * -(-max_bytes // 3) + 4096)


async def read_uploads(request: Request, max_bytes: int) -> tuple[list[Upload], int | None]:
    """The images of a predict request (multipart or JSON) and the top_k a JSON body asks for."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, max_bytes), None
    if media_type == "application/json":
        return await _read_json(request, max_bytes)
    if not await request.body():
        raise ApiError(422, EMPTY_BODY)
    raise ApiError(415, f"Unsupported Content-Type {media_type or '(none)'}: "
                        "send multipart/form-data or application/json.")


async def _read_multipart(request: Request, max_bytes: int) -> list[Upload]:
    try:
        async with request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES) as form:
            parts = form.getlist("files") + form.getlist("file")
            if not parts:
                raise ApiError(422, EMPTY_BODY)
            uploads = []
            for i, part in enumerate(parts, 1):
                if not isinstance(part, UploadFile):
                    raise ApiError(422, f"Form field {i} holds text, not a file: attach image files to 'files'.")
                if part.size is not None and part.size > max_bytes:  # known before reading it
                    raise ApiError(413, f"{describe(part.filename, i)} has {part.size:,} bytes, "
                                        f"over the {max_bytes:,}-byte limit per image.")
                uploads.append(Upload(part.filename, await part.read()))
            return uploads
    except HTTPException as exc:
        if exc.status_code != 400:  # the body limit's 413
            raise
        raise ApiError(422, f"The multipart body could not be read: {exc.detail}") from None


async def _read_json(request: Request, max_bytes: int) -> tuple[list[Upload], int | None]:
    body = await request.body()
    if not body.strip():
        raise ApiError(422, EMPTY_BODY)
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(422, describe_errors(exc.errors())) from None
    data = await run_in_threadpool(
        lambda: [decode_base64(text, f"image {i}", max_bytes) for i, text in enumerate(payload.images, 1)])
    return [Upload(None, d) for d in data], payload.top_k


def describe_errors(errors: Sequence[Any]) -> str:
    """One sentence for pydantic's or FastAPI's list of validation errors."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})."
    loc = [str(part) for part in first["loc"] if part != "body"]
    if loc and loc[0] in ("query", "header", "path", "cookie"):
        loc = [f"{loc[0]} parameter {'.'.join(loc[1:])}"]
    where = f"{'.'.join(loc)}: " if loc else ""
    others = len(errors) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"The request is invalid: {where}{first['msg']}{more}."


# --- checking and decoding one image ------------------------------------------------------------

def describe(filename: str | None, position: int) -> str:
    """How error messages name an image: 'image 2 (shirt.png)'."""
    return f"image {position} ({filename})" if filename else f"image {position}"


def decode_base64(text: str, name: str, max_bytes: int) -> bytes:
    """Standard base64, optionally a data URL (data:image/png;base64,...); whitespace is ignored."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(422, f"{name} is a data URL without base64 data (expected data:<type>;base64,...).")
    text = "".join(text.split())
    if len(text) > 4 * -(-max_bytes // 3):  # the base64 length of max_bytes bytes, checked before decoding
        raise ApiError(413, f"{name} is over the {max_bytes:,}-byte limit per image.")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or a plain ValueError for characters outside ASCII
        raise ApiError(422, f"{name} is not valid base64 ({exc}).") from None


def check_upload(data: bytes, name: str, max_bytes: int, max_pixels: int) -> tuple[int, bool]:
    """Check one uploaded image against the limits before decoding it: its pixel count, and
    whether it is an animation (only its first frame is read)."""
    if not data:
        raise ApiError(422, f"{name} is empty.")
    if len(data) > max_bytes:
        raise ApiError(413, f"{name} has {len(data):,} bytes, over the {max_bytes:,}-byte limit per image.")
    return _check_header(data, name, max_pixels)


def decode_upload(data: bytes, name: str, animated: bool) -> torch.Tensor:
    """A checked upload (`check_upload`) decoded to uint8 (C, H, W)."""
    try:
        return decode_image_bytes(data, first_frame_only=animated)
    except UnreadableImage as exc:
        raise ApiError(415, f"{name} could not be decoded ({exc}).") from None


def _check_header(data: bytes, name: str, max_pixels: int) -> tuple[int, bool]:
    """Refuse unknown formats and oversized images from the header alone; (pixels, animated)."""
    Image.init()  # register every plugin: Image.open(formats=...) sees only the loaded ones (not WEBP, TIFF)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as header:
            width, height = header.size
            animated = bool(getattr(header, "is_animated", False))
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above any sensible max_pixels
        raise ApiError(413, f"{name} claims more pixels than Pillow will open (a decompression bomb?); "
                            f"the limit is {max_pixels:,}.") from None
    except Exception:  # Pillow raises many types for files it cannot identify
        raise ApiError(415, f"{name} is not an image in a supported format ({', '.join(FORMATS)}).") from None
    if width * height > max_pixels:
        raise ApiError(413, f"{name} is {width}x{height} = {width * height:,} pixels, "
                            f"over the {max_pixels:,}-pixel limit.")
    return width * height, animated
