"""The image spec on torch tensors: decoding files into uint8 tensors, fitting them to a model's
input, and the test-time augmentation views. Shared by folder datasets, predict, serve and Grad-CAM.

torchvision's `decode_image` does the work; Pillow is the fallback for formats it does not
decode (BMP, TIFF, CMYK JPEG, ...). Alpha is composited over white, EXIF rotation applied.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from .spec import DEFAULT_TTA, ORIENTATION, UnreadableImage, tta_views


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to uint8 (C, H, W) with C in {1, 3}; the first frame of animations."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"cannot read the file: {exc.strerror or exc}") from None
    return decode_image_bytes(data)


def decode_image_bytes(data: bytes, first_frame_only: bool = False) -> torch.Tensor:
    """Decode an encoded image (file contents or an upload) to uint8 (C, H, W), C in {1, 3}.

    first_frame_only: decode with Pillow, which reads one frame, where torchvision would
    decode every frame of an animation at once.
    """
    if not data:
        raise UnreadableImage("empty file")
    # Pillow reads PNG: torchvision's decoder kills the process (SIGSEGV) on any error libpng
    # reports mid-image (a bad checksum, missing pixel data), and returns palette indices as pixels.
    # The signature test is looser than torchvision's (the first four bytes), so nothing it
    # would take for a PNG gets to it.
    if first_frame_only or data[1:4] == b"PNG":
        image = _read_with_pillow(io.BytesIO(data))
    else:
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
        except (RuntimeError, ValueError):
            image = _read_with_pillow(io.BytesIO(data))
    if image.ndim == 4:  # animated GIF/WebP: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return _drop_alpha(image)


def _read_with_pillow(source: Path | BinaryIO) -> torch.Tensor:
    try:
        with Image.open(source) as pil:
            # exif_transpose copies the image even when there is nothing to turn: ask first
            if pil.getexif().get(ORIENTATION, 1) != 1:
                pil = ImageOps.exif_transpose(pil)
            return _pil_with_alpha(pil)
    except UnidentifiedImageError:  # its message names a memory address when reading bytes
        raise UnreadableImage("not an image in a format either decoder reads") from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def from_pil(pil: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 (C, H, W), C in {1, 3}: grayscale kept, alpha composited over white."""
    return _drop_alpha(_pil_with_alpha(pil))


def _pil_with_alpha(pil: Image.Image) -> torch.Tensor:
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: keep the high byte, as torchvision's to_dtype(uint8, scale=True) does
        return (TF.pil_to_tensor(pil.convert("I")).clamp(0, 65535) >> 8).to(torch.uint8)
    # grayscale stays one channel (as torchvision decodes it); alpha is kept for compositing
    gray = pil.mode in ("L", "LA", "La", "1", "F")
    alpha = pil.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in pil.info
    mode = ("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB")
    array = np.asarray(pil if pil.mode == mode else pil.convert(mode))
    return torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1).contiguous()


def _drop_alpha(image: torch.Tensor) -> torch.Tensor:
    channels = image.shape[0]
    if channels in (2, 4):  # gray+alpha or RGBA: composite over white
        colour, alpha = image[:-1].float(), image[-1:].float() / 255
        image = (colour * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return image


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 (..., C, H, W) between grayscale and RGB."""
    have = image.shape[-3]
    if have == channels:
        return image
    if channels == 3 and have == 1:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    if channels == 1 and have == 3:
        return TF.rgb_to_grayscale(image)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (..., C, H, W) to `size` (H, W) with antialiasing; a no-op when it matches.

    A split on disk (data.prepared.DiskImages) is resized a slice at a time into one
    tensor in memory, so only the result need fit."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if not isinstance(image, torch.Tensor):
        out = torch.empty((*image.shape[:-2], *size), dtype=image.dtype)
        for start, rows in image.slices():
            out[start:start + len(rows)] = TF.resize(rows, list(size), antialias=True)
        return out
    return TF.resize(image, list(size), antialias=True)


def fit(image: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (..., C, H, W) of any size and channel count -> `channels` channels of `size` (H, W)."""
    return resize(to_channels(image, channels), size)


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str = DEFAULT_TTA,
               flip: bool = True) -> torch.Tensor:
    """Logits (float32) averaged over the test-time views (images.spec.TTA_VIEWS) of the normalised
    batch `x`, computed in one forward pass."""
    views = tta_views(tta, flip)
    if len(views) == 1:
        return forward(x).float()
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect") if any(v.dy or v.dx for v in views) else None
    batch = []
    for view in views:
        image = x if not (view.dy or view.dx) else padded[..., 1 + view.dy:1 + view.dy + h, 1 + view.dx:1 + view.dx + w]
        batch.append(image.flip(3) if view.mirrored else image)
    out = forward(torch.cat(batch).contiguous(memory_format=torch.channels_last))
    return out.float().unflatten(0, (len(views), -1)).mean(0)  # unflatten: the batch axis stays symbolic in an export
