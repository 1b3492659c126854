"""The image spec on numpy arrays, for the torch-free ONNX runtime: decoding with Pillow, fitting to
a model's input and test-time views, matching images.tensors bit for bit or within one grey level.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from ..errors import CnnlabError
from .spec import DEFAULT_TTA, ORIENTATION, UnreadableImage, tta_views


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 (H, W, C) with C in {1, 3}, as images.tensors.read_image does:
    EXIF rotation applied, the first frame of animations, alpha composited over white,
    16-bit reduced to 8-bit, palettes expanded to RGB, grayscale kept as one channel."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"Image file {path} does not exist.")
    try:
        # Pillow opens bytes in memory in half the time it takes to open the path itself (28 against
        # 55 us for a 28x28 PNG, reading included); exif_transpose copies the image even when there
        # is nothing to turn, so ask first
        with Image.open(io.BytesIO(path.read_bytes())) as pil:
            if pil.getexif().get(ORIENTATION, 1) != 1:
                pil = ImageOps.exif_transpose(pil)
            array = pil_to_array(pil)
    except Exception as exc:  # Pillow raises many types for broken files
        raise UnreadableImage(f"{path} is not a readable image ({type(exc).__name__}: {exc}).") from None
    return drop_alpha(array)


def pil_to_array(pil: Image.Image) -> np.ndarray:
    """uint8 (H, W, C), alpha still attached."""
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit: keep the high byte, as torchvision's to_dtype(uint8, scale=True) does
        return (np.clip(np.asarray(pil), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    has_alpha = pil.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in pil.info
    gray = pil.mode in ("1", "L", "LA", "La", "F")
    mode = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    array = np.asarray(pil if pil.mode == mode else pil.convert(mode))
    return array[..., None] if array.ndim == 2 else array


def drop_alpha(image: np.ndarray) -> np.ndarray:
    """(H, W, C) with C in {2, 4} -> colour composited over white, in images.tensors' float32 arithmetic."""
    if image.shape[-1] not in (2, 4):
        return image
    colour, alpha = image[..., :-1].astype(np.float32), image[..., -1:].astype(np.float32) / np.float32(255)
    return np.round(colour * alpha + np.float32(255) * (np.float32(1) - alpha)).astype(np.uint8)


def as_uint8(array: np.ndarray) -> np.ndarray:
    """Accept integer images on the 0-255 scale and float images on the 0-1 scale."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise CnnlabError(f"An integer image array must hold values 0-255, got {array.min()}-{array.max()}.")
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise CnnlabError(f"Cannot classify an array of dtype {array.dtype}; pass uint8 or floats in [0, 1].")
    return np.round(np.clip(array.astype(np.float32), 0, 1) * np.float32(255)).astype(np.uint8)


# ---------------------------------------------------------------- preprocessing (uint8 N, C, H, W)

def to_channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 (N, C, H, W) between grayscale and RGB, as torchvision does."""
    have = batch.shape[1]
    if have == channels:
        return batch
    if channels == 3 and have == 1:
        return np.repeat(batch, 3, axis=1)
    if channels == 1 and have == 3:
        return _rgb_to_gray(batch)
    raise CnnlabError(f"Cannot convert {have}-channel images to {channels} channels.")


def _rgb_to_gray(batch: np.ndarray) -> np.ndarray:
    # ITU-R 601 weights in float32, truncated to uint8, exactly as torchvision's rgb_to_grayscale.
    # Its kernel rounds each `a + w * b` once (a fused multiply-add); float64 holds the exact
    # product of two float32 values, so one rounding to float32 reproduces it bit for bit.
    r, g, b = (batch[:, i].astype(np.float64) for i in range(3))
    gray = (r * float(np.float32(0.2989))).astype(np.float32)
    gray = (gray.astype(np.float64) + float(np.float32(0.587)) * g).astype(np.float32)
    gray = (gray.astype(np.float64) + float(np.float32(0.114)) * b).astype(np.float32)
    return gray.astype(np.uint8)[:, None]


def resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (N, C, H, W) to `size` (H, W) with antialiased bilinear; a no-op when it matches.

    Pillow's BILINEAR filter is the one torchvision's antialias=True imitates: the results
    agree to within one grey level."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    height, width = size
    return np.stack([np.stack([np.asarray(Image.fromarray(channel).resize((width, height), Image.BILINEAR,
                                                                          reducing_gap=None))
                               for channel in image]) for image in batch])


def fit(batch: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, C, H, W) of any size and channel count -> `channels` channels of `size` (H, W)."""
    return resize(to_channels(batch, channels), size)


def tta_logits(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tta: str = DEFAULT_TTA,
               flip: bool = True) -> np.ndarray:
    """Logits averaged over the test-time views (images.spec.TTA_VIEWS) of the normalised batch `x`,
    as images.tensors.tta_logits computes them (numpy's "reflect" padding is torch's)."""
    views = tta_views(tta, flip)
    if len(views) == 1:
        return forward(x)
    h, w = x.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    batch = []
    for view in views:
        image = x if not (view.dy or view.dx) else padded[..., 1 + view.dy:1 + view.dy + h, 1 + view.dx:1 + view.dx + w]
        batch.append(image[..., ::-1] if view.mirrored else image)
    return forward(np.concatenate(batch)).reshape(len(views), len(x), -1).mean(0, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
