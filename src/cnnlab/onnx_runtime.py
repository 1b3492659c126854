"""`OnnxClassifier`: classify images with an exported model.onnx through onnxruntime alone.

It needs only onnxruntime, numpy and Pillow, never PyTorch: the preprocessing facts travel in
the model's metadata, and decoding, channel conversion, resizing, normalisation and test-time
augmentation mirror cnnlab.images, cnnlab.data and cnnlab.engine with numpy and Pillow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

from .errors import CnnlabError

ONNX_FILE = "model.onnx"
EXPORT_FORMAT = 1  # version of the metadata layout below; a newer one is refused
# model.json fields stored, JSON-encoded, one metadata property each
METADATA_KEYS = ("architecture", "num_classes", "class_names", "in_channels", "image_size", "mean", "std",
                 "tta", "tta_flip", "weights_sha256")
_KNOWN_KEYS = ("cnnlab_export_format", "cnnlab_version", *METADATA_KEYS)
PREDICT_BATCH = 256  # images per forward pass in predict

ImageLike = Union[str, Path, Image.Image, np.ndarray]


class Prediction(NamedTuple):
    label: str
    probability: float
    index: int


class UnreadableImage(CnnlabError):
    """A file that exists but that Pillow cannot decode as an image."""


# ---------------------------------------------------------------- metadata

def encode_metadata(meta: dict[str, Any], version: str) -> dict[str, str]:
    """model.json fields -> the string properties stored in an exported model."""
    values = {"cnnlab_export_format": EXPORT_FORMAT, "cnnlab_version": version,
              "tta": "none", "tta_flip": True, **{k: meta[k] for k in METADATA_KEYS if k in meta}}
    return {key: json.dumps(value) for key, value in values.items()}


def decode_metadata(props: dict[str, str], source: str | Path) -> dict[str, Any]:
    """The inverse of encode_metadata; a model cnnlab did not export is a CnnlabError."""
    missing = [k for k in ("cnnlab_export_format", *METADATA_KEYS) if k not in props]
    if missing:
        raise CnnlabError(f"{source} lacks the cnnlab metadata {', '.join(missing)}; "
                          "export it with `cnnlab export RUN_DIR --format onnx`.")
    try:
        meta = {key: json.loads(value) for key, value in props.items() if key in _KNOWN_KEYS}
    except json.JSONDecodeError:
        raise CnnlabError(f"{source} holds malformed cnnlab metadata; export it again.") from None
    if meta["cnnlab_export_format"] > EXPORT_FORMAT:
        raise CnnlabError(f"{source} was exported by a newer cnnlab (format {meta['cnnlab_export_format']}); "
                          "upgrade cnnlab.")
    return meta


# ---------------------------------------------------------------- decoding

def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 (H, W, C) with C in {1, 3}, as cnnlab.images.read_image does:
    EXIF rotation applied, the first frame of animations, alpha composited over white,
    16-bit reduced to 8-bit, palettes expanded to RGB, grayscale kept as one channel."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as pil:
            array = _pil_to_array(ImageOps.exif_transpose(pil))
    except Exception as exc:  # Pillow raises many types for broken files
        raise UnreadableImage(f"{path} is not a readable image ({type(exc).__name__}: {exc}).") from None
    return _drop_alpha(array)


def _pil_to_array(pil: Image.Image) -> np.ndarray:
    """uint8 (H, W, C), alpha still attached."""
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit: keep the high byte, as torchvision's to_dtype(uint8, scale=True) does
        return (np.clip(np.asarray(pil), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    has_alpha = pil.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in pil.info
    gray = pil.mode in ("1", "L", "LA", "La", "F")
    mode = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    array = np.asarray(pil.convert(mode))
    return array[..., None] if array.ndim == 2 else array


def _drop_alpha(image: np.ndarray) -> np.ndarray:
    """(H, W, C) with C in {2, 4} -> colour composited over white, in cnnlab.images' float32 arithmetic."""
    if image.shape[-1] not in (2, 4):
        return image
    colour, alpha = image[..., :-1].astype(np.float32), image[..., -1:].astype(np.float32) / np.float32(255)
    return np.round(colour * alpha + np.float32(255) * (np.float32(1) - alpha)).astype(np.uint8)


def _as_uint8(array: np.ndarray) -> np.ndarray:
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


def tta_logits(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tta: str = "none",
               flip: bool = True) -> np.ndarray:
    """Average logits over the test-time views of cnnlab.engine.tta_logits: the image, its mirror
    (when flips are label-safe), and for flip-translate the views shifted one pixel up-left and
    down-right."""
    views = [x]
    if tta in ("flip", "flip-translate") and flip:
        views.append(x[..., ::-1])
    if tta == "flip-translate":
        h, w = x.shape[-2:]
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")  # torch's "reflect" too
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        views += shifted + ([v[..., ::-1] for v in shifted] if flip else [])
    if len(views) == 1:
        return forward(x)
    return forward(np.concatenate(views)).reshape(len(views), len(x), -1).mean(0, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- the classifier

class OnnxClassifier:
    """An exported model plus its preprocessing, run by onnxruntime; the same interface as Classifier."""

    def __init__(self, session: ort.InferenceSession, meta: dict[str, Any]):
        self.session = session
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.in_channels: int = int(meta["in_channels"])
        self.image_size: tuple[int, int] = tuple(meta["image_size"])
        self.tta: str = meta.get("tta", "none")
        if self.tta not in ("none", "flip", "flip-translate"):
            raise CnnlabError(f"Unknown test-time augmentation {self.tta!r} in the model's metadata.")
        # the same float32 arithmetic as cnnlab.data.Normalize, so inputs agree bit for bit
        mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
        self._scale = (np.float32(1) / (np.float32(255) * std)).reshape(1, -1, 1, 1)
        self._shift = (mean / std).reshape(1, -1, 1, 1)
        self._input = session.get_inputs()[0].name

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             threads: int | None = None) -> "OnnxClassifier":
        """Open an exported .onnx file, or the model.onnx of a run directory."""
        path = Path(path)
        if path.is_dir():
            if not (path / ONNX_FILE).is_file():
                raise CnnlabError(f"{path} holds no {ONNX_FILE}; run `cnnlab export {path} --format onnx` first.")
            path = path / ONNX_FILE
        elif not path.is_file():
            raise CnnlabError(f"{path} does not exist.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own types for malformed files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CnnlabError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {first}).") from None
        return cls(session, decode_metadata(session.get_modelmeta().custom_metadata_map, path))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) of any size and channel count -> the normalised float32 input of the model."""
        batch = resize(to_channels(_check_batch(batch), self.in_channels), self.image_size)
        return batch.astype(np.float32) * self._scale - self._shift

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits of the plain network for a normalised float32 batch (N, C, H, W)."""
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a uint8 batch (N, C, H, W), with the test-time augmentation the model records."""
        return tta_logits(self.forward, self.prepare(batch), self.tta, bool(self.meta.get("tta_flip", True)))

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) for each image: paths, PIL images, or arrays (H, W) / (H, W, C)."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise CnnlabError("No images were given to predict.")
        k = max(1, min(top_k, len(self.class_names)))
        results = []
        for start in range(0, len(images), PREDICT_BATCH):  # decoded a batch at a time, to bound memory
            batch = np.stack([resize(to_channels(self._one(image)[None], self.in_channels), self.image_size)[0]
                              for image in images[start:start + PREDICT_BATCH]])
            probs = softmax(self.logits(batch))
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            results += [[Prediction(self.class_names[i], float(p[i]), int(i)) for i in idx]
                        for p, idx in zip(probs, top)]
        return results

    def _one(self, image: ImageLike) -> np.ndarray:
        """One image as uint8 (C, H, W)."""
        if isinstance(image, (str, Path)):
            return read_image(image).transpose(2, 0, 1)
        if isinstance(image, Image.Image):
            return _drop_alpha(_pil_to_array(image)).transpose(2, 0, 1)
        if isinstance(image, np.ndarray):
            array = _as_uint8(image)
            if array.ndim == 2:
                array = array[..., None]
            if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
                raise CnnlabError(f"An image array must be (H, W) or (H, W, C) with C in 1-4, got {image.shape}.")
            return _drop_alpha(array).transpose(2, 0, 1)
        raise CnnlabError(f"Cannot classify an object of type {type(image).__name__}; "
                          "pass a path, PIL image or numpy array.")


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.dtype != np.uint8:
        shape = getattr(batch, "shape", None)
        raise CnnlabError(f"Expected a uint8 numpy batch (N, C, H, W), got {type(batch).__name__} {shape}.")
    return batch
