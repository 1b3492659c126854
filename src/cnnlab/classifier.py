"""`Classifier`: a trained model plus its preprocessing, loaded from a run directory.

It reads only model.safetensors and model.json (never a pickle), and applies the stored
channel count, image size, mean and std itself, so callers pass plain images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import torch
from PIL import Image

from .checkpoint import MODEL_FILE, MODEL_META, load_weights, read_model_meta
from .data import Normalize
from .engine import autocast, tta_logits
from .errors import CnnlabError
from .images import UnreadableImage, from_pil, read_image, resize, to_channels
from .models import create_model

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


class Prediction(NamedTuple):
    label: str
    probability: float
    index: int


class Classifier:
    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise CnnlabError(f"precision must be fp32 or bf16, got {precision!r}.")
        self.meta = meta
        self.device = torch.device(device)
        # fp32 by default, as `cnnlab evaluate` and exported models compute; bf16 is about 1.8x
        # faster on CPUs with AVX512-BF16 and agrees on all but a handful of images in 10,000
        self.precision = precision
        self.tta: str = meta.get("tta", "none")  # test-time augmentation; may be changed after loading
        # channels_last: the faster convolution layout on CPUs and GPUs alike
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.class_names: list[str] = list(meta["class_names"])
        self.in_channels: int = meta["in_channels"]
        self.image_size: tuple[int, int] = tuple(meta["image_size"])
        # the same normalisation object training used, so both see bit-identical inputs
        self._normalize = Normalize(meta["mean"], meta["std"], self.device, channels_last=True)

    @classmethod
    def load(cls, run_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> "Classifier":
        """Rebuild the model from a run directory after checking the weights' sha256."""
        run_dir = Path(run_dir)
        meta = read_model_meta(run_dir)
        state = load_weights(run_dir, meta)
        try:
            model = create_model(meta["architecture"], meta["in_channels"], meta["num_classes"], **meta["model_args"])
        except CnnlabError as exc:
            raise CnnlabError(f"{run_dir / MODEL_META} does not describe a buildable model: {exc}") from None
        _check_fit(model.state_dict(), state, meta, run_dir)
        model.load_state_dict(state, strict=True)
        return cls(model, meta, device, precision)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) of any size and channel count -> the normalised float input of the model."""
        images = resize(to_channels(images, self.in_channels), self.image_size)
        return self._normalize(images)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for a uint8 batch (N, C, H, W), with the test-time augmentation `self.tta`."""
        with autocast(self.device, self.precision == "bf16"):
            return tta_logits(self.model, self.prepare(images), self.tta, self.meta.get("tta_flip", True)).float()

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) for each image: paths, PIL images, or tensors (C,H,W)/(N,C,H,W)."""
        batch = self._to_batch(images)
        probs = torch.softmax(self.logits(batch), dim=1)
        k = max(1, min(top_k, len(self.class_names)))
        top = probs.topk(k, dim=1)
        return [[Prediction(self.class_names[i], float(p), int(i)) for p, i in zip(ps.tolist(), idx.tolist())]
                for ps, idx in zip(top.values, top.indices)]

    def _to_batch(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return _as_uint8(images)
        if isinstance(images, (str, Path, Image.Image, torch.Tensor)):
            images = [images]
        items = [self._one(image) for image in images]
        if not items:
            raise CnnlabError("No images were given to predict.")
        return torch.stack([resize(to_channels(x, self.in_channels), self.image_size) for x in items])

    def _one(self, image: ImageLike) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise CnnlabError(f"Image file {image} does not exist.")
            try:
                return read_image(image)
            except UnreadableImage as exc:
                raise CnnlabError(f"{image} is not a readable image ({exc}).") from None
        if isinstance(image, Image.Image):
            return from_pil(image)
        if isinstance(image, torch.Tensor):
            return _as_uint8(image if image.ndim == 3 else image.unsqueeze(0))
        raise CnnlabError(f"Cannot classify an object of type {type(image).__name__}; pass a path, PIL image or tensor.")


def _check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], meta: dict[str, Any],
               run_dir: Path) -> None:
    """Every tensor the model.json architecture needs, with its shape, and no others; else CnnlabError."""
    described = (f"{meta['architecture']} with {meta['num_classes']} classes, {meta['in_channels']} input channel(s)"
                 f" and model_args {meta['model_args']}")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CnnlabError(f"{run_dir / MODEL_FILE} does not hold the weights of {described} (as {MODEL_META} says): "
                          f"{len(missing)} tensor(s) missing, {len(unexpected)} unexpected, "
                          f"e.g. {(missing + unexpected)[0]!r}.")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CnnlabError(f"{run_dir / MODEL_FILE} does not fit {described} (as {MODEL_META} says): "
                              f"{name!r} has shape {list(state[name].shape)}, the model needs {list(tensor.shape)}.")


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Accept uint8 images as they are and float images on the 0-1 scale."""
    if x.dtype == torch.uint8:
        return x
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
