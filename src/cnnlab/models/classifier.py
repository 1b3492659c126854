"""`Classifier`: a trained model plus its model card, loaded from a run directory.

It reads only model.safetensors and model.json (never a pickle), and applies the card's
channel count, image size, mean, std and test-time augmentation itself, so callers pass plain images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from ..card import ModelCard, Prediction
from ..data.batches import Normalize
from ..devices import autocast
from ..errors import CnnlabError
from ..images.tensors import UnreadableImage, fit, from_pil, read_image, tta_logits
from ..rundir import RunDir
from .registry import check_model_name, model_from_card
from .source import is_import_path

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


class Classifier:
    def __init__(self, model: torch.nn.Module, card: ModelCard, device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise CnnlabError(f"precision must be fp32 or bf16, got {precision!r}.")
        self.card = card
        self.device = torch.device(device)
        # fp32 by default, as `cnnlab evaluate` and exported models compute; bf16 is about 1.8x
        # faster on CPUs with AVX512-BF16 and agrees on all but a handful of images in 10,000
        self.precision = precision
        self.tta: str = card.tta  # test-time augmentation; may be changed after loading
        # channels_last: the faster convolution layout on CPUs and GPUs alike
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.class_names: list[str] = list(card.class_names)
        self.in_channels: int = card.in_channels
        self.image_size: tuple[int, int] = card.image_size
        # the same normalisation object training used, so both see bit-identical inputs
        self._normalize = Normalize(card.mean, card.std, self.device, channels_last=True)

    @classmethod
    def load(cls, run_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> "Classifier":
        """Rebuild the model from a run directory after checking the weights' sha256."""
        run = RunDir(run_dir)
        card = run.read_card()
        if not is_import_path(card.architecture):  # a user's own model explains itself (source.load_recorded)
            try:
                check_model_name(card.architecture)
            except CnnlabError as exc:
                raise CnnlabError(f"{run / run.CARD} names the architecture {card.architecture!r}, which this "
                                  f"process does not know ({str(exc).rstrip('.')}); if it is your own model, "
                                  "register it in a module that is imported (or an entry point of group "
                                  "cnnlab.models), or train with --model path/to/file.py:Name.") from None
        state = run.read_weights(card)
        try:
            model = model_from_card(card, str(run / run.CARD))
        except CnnlabError as exc:
            if is_import_path(card.architecture):
                raise
            raise CnnlabError(f"{run / run.CARD} does not describe a buildable model: {exc}") from None
        _check_fit(model.state_dict(), state, card, run)
        model.load_state_dict(state, strict=True)
        return cls(model, card, device, precision)

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) of any size and channel count -> the card's channels and image size."""
        return fit(images, self.in_channels, self.image_size)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) of any size and channel count -> the normalised float input of the model."""
        return self._normalize(self.fit(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for a uint8 batch (N, C, H, W) of any size, with the test-time augmentation `self.tta`."""
        return self.logits_of_fitted(self.fit(images))

    @torch.inference_mode()
    def logits_of_fitted(self, batch: torch.Tensor) -> torch.Tensor:
        """`logits` for a batch already fitted to the model's input (`fit`), as predict and serve build them."""
        with autocast(self.device, self.precision == "bf16"):
            return tta_logits(self.model, self._normalize(batch), self.tta, self.card.tta_flip).float()

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) for each image: paths, PIL images, or tensors (C,H,W)/(N,C,H,W)."""
        probs = torch.softmax(self.logits_of_fitted(self._to_batch(images)), dim=1)
        k = max(1, min(top_k, len(self.class_names)))
        top = probs.topk(k, dim=1)
        return [[Prediction(self.class_names[i], float(p), int(i)) for p, i in zip(ps.tolist(), idx.tolist())]
                for ps, idx in zip(top.values, top.indices)]

    def _to_batch(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """The images as one fitted uint8 batch."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return self.fit(_as_uint8(images))
        if isinstance(images, (str, Path, Image.Image, torch.Tensor)):
            images = [images]
        items = [self._one(image) for image in images]
        if not items:
            raise CnnlabError("No images were given to predict.")
        return torch.stack([self.fit(x) for x in items])

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


def _check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], card: ModelCard,
               run: RunDir) -> None:
    """Every tensor the card's architecture needs, with its shape, and no others; else CnnlabError."""
    described = (f"{card.architecture} with {card.num_classes} classes, {card.in_channels} input channel(s)"
                 f" and model_args {card.model_args}")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CnnlabError(f"{run / run.WEIGHTS} does not hold the weights of {described} (as {run.CARD} says): "
                          f"{len(missing)} tensor(s) missing, {len(unexpected)} unexpected, "
                          f"e.g. {(missing + unexpected)[0]!r}.")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CnnlabError(f"{run / run.WEIGHTS} does not fit {described} (as {run.CARD} says): "
                              f"{name!r} has shape {list(state[name].shape)}, the model needs {list(tensor.shape)}.")


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Accept uint8 images as they are and float images on the 0-1 scale."""
    if x.dtype == torch.uint8:
        return x
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
