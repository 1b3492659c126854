"""Grad-CAM (Selvaraju et al. 2017): heat maps of the image regions behind a prediction.

`gradcam` weights a convolutional layer's feature maps by the spatially averaged gradients
of the target logit; `explain_files` saves image-and-overlay figures for `cnnlab explain`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from ..errors import CnnlabError
from ..images.tensors import UnreadableImage, read_image, to_channels
from ..models.classifier import Classifier
from ..rundir import RunDir

PROBE_SIZE = (32, 32)  # input side used to find the target layer when no batch is given
ALPHA = 0.5  # weight of the heat-map colours in an overlay


def find_target_layer(model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
    """The layer Grad-CAM reads: the output of the last convolutional stage.

    A probe forward pass (in eval mode, without gradients) records every module's output in
    the order the modules finish. The choice is the last module whose output is a feature map
    of the same size as the last `nn.Conv2d`'s output: so the batch norm, activation and
    residual addition after the last convolution are included (for resnets the whole last
    stage, for fastnet its `features`) but global pooling is not. Convolutions whose output
    is 1x1 (a deep network on small images, such as vgg11-small on 28x28 inputs) are passed
    over, since a 1x1 map has nothing to localise: the last convolution with a larger output
    sets the size instead.

    x: an example batch, whose size decides that; without one a 32x32 probe is used.
    """
    events = _probe(model, x)
    sizes = [size for module, size in events if isinstance(module, nn.Conv2d) and size[0] * size[1] > 1]
    if not sizes:
        raise CnnlabError(f"{type(model).__name__} has no convolutional feature map larger than 1x1 "
                          "on this input for Grad-CAM to explain.")
    return next(module for module, size in reversed(events) if size == sizes[-1])


def _probe(model: nn.Module, x: torch.Tensor | None) -> list[tuple[nn.Module, tuple[int, int]]]:
    """(module, output height and width) for every module returning a 4-D tensor, in finishing order."""
    if x is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else 3
        param = next(model.parameters())
        x = torch.zeros(1, channels, *PROBE_SIZE, device=param.device, dtype=param.dtype)
    events: list[tuple[nn.Module, tuple[int, int]]] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            events.append((module, tuple(output.shape[-2:])))

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return events


def gradcam(model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
            layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM heat maps (N, H, W) in [0, 1] at the input resolution, for a normalised float batch.

    target: the class to explain, one for all images or one per image; default the predicted class.
    layer: the layer to read (default `find_target_layer(model, x)`).
    Runs in fp32 and eval mode; the model's mode, hooks and parameter gradients are left as they were.
    """
    heat, _ = gradcam_with_logits(model, x, target, layer)
    return heat


def gradcam_with_logits(model: nn.Module, x: torch.Tensor,
                        target: int | Sequence[int] | torch.Tensor | None = None,
                        layer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gradcam`, plus the logits (N, classes) of the same forward pass."""
    # A normal tensor even when the caller is in inference mode, so autograd can record the pass.
    with torch.inference_mode(False):
        x = x.detach().clone().float()
    layer = layer if layer is not None else find_target_layer(model, x)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    was_training = model.training
    try:
        model.eval()  # batch norm in eval mode keeps the images of a batch independent
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            # Gradients flow from the input, so frozen parameters need no change of requires_grad.
            logits = model(x.requires_grad_(True)).float()
            if not captured:
                raise CnnlabError("The Grad-CAM layer is not part of the model's forward pass.")
            activation = captured[-1]  # a module called twice: its last output is the one used
            chosen = _targets(target, logits)
            score = logits.gather(1, chosen[:, None]).sum()
            # autograd.grad, not backward(): the parameters' .grad stay untouched
            (grads,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # one weight per channel: the averaged gradient
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _rescale(cam), logits.detach()


def _targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    n, classes = logits.shape
    if target is None:
        return logits.argmax(1)
    chosen = torch.as_tensor(target, dtype=torch.int64, device=logits.device).flatten()
    if chosen.numel() == 1:
        chosen = chosen.expand(n)
    if chosen.numel() != n:
        raise CnnlabError(f"Grad-CAM needs one target class per image: got {chosen.numel()} for {n} images.")
    if chosen.min() < 0 or chosen.max() >= classes:
        raise CnnlabError(f"Grad-CAM target classes must be between 0 and {classes - 1}.")
    return chosen


def _rescale(cam: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1]; a map without any positive evidence stays all zero."""
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span, torch.zeros_like(cam))


def overlay(image_uint8_chw: torch.Tensor | np.ndarray, heat: torch.Tensor | np.ndarray,
            alpha: float = ALPHA) -> np.ndarray:
    """A heat map in the "jet" colour map blended over an image: uint8 (H, W, 3).

    image: uint8 (C, H, W), grayscale or colour. heat: (h, w) in [0, 1], resized to the image if needed.
    """
    image = to_channels(torch.as_tensor(np.asarray(image_uint8_chw)), 3)
    heat = torch.as_tensor(np.asarray(heat), dtype=torch.float32)
    if tuple(heat.shape) != tuple(image.shape[-2:]):
        heat = F.interpolate(heat[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    colours = matplotlib.colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3] * 255
    base = image.permute(1, 2, 0).numpy().astype(np.float32)
    return np.round((1 - alpha) * base + alpha * colours).clip(0, 255).astype(np.uint8)


def explain_files(run_dir: str | Path, paths: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Save a Grad-CAM figure per image file (the image beside its overlay, titled with the
    predicted class and its probability) as OUT_DIR/<name>-gradcam.png; default RUN_DIR/explain.

    The probability is that of the plain forward pass the heat map explains (no test-time
    augmentation), so it can differ slightly from `cnnlab predict`'s.
    """
    classifier = Classifier.load(run_dir)
    images = [_read(Path(p)) for p in paths]  # every file checked before anything is written
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / RunDir.EXPLAIN
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, image in zip(paths, images):
        heat, logits = gradcam_with_logits(classifier.model, classifier.prepare(image[None]))
        probs = torch.softmax(logits[0], dim=0)
        index = int(probs.argmax())
        title = f"{classifier.class_names[index]} ({100 * float(probs[index]):.1f}%)"
        target = _unique_name(out, Path(path).stem, written)
        _save_figure(image, heat[0], Path(path).name, title, target)
        written.append(target)
    return written


def _read(path: Path) -> torch.Tensor:
    if path.is_dir():
        raise CnnlabError(f"{path} is a folder; pass image files.")
    if not path.is_file():
        raise CnnlabError(f"Image file {path} does not exist.")
    try:
        return read_image(path)
    except UnreadableImage as exc:
        raise CnnlabError(f"{path} is not a readable image ({exc}).") from None


def _unique_name(folder: Path, stem: str, taken: list[Path]) -> Path:
    """OUT/<stem>-gradcam.png, numbered when two inputs share a name."""
    stem = re.sub(r"[^\w.-]+", "-", stem) or "image"
    target, n = folder / f"{stem}-gradcam.png", 1
    while target in taken:
        n += 1
        target = folder / f"{stem}-{n}-gradcam.png"
    return target


def _save_figure(image: torch.Tensor, heat: torch.Tensor, name: str, title: str, path: Path) -> None:
    # Figure without pyplot renders through the Agg canvas: no display and no global state.
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    if image.shape[0] == 1:
        left.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
    else:
        left.imshow(image.permute(1, 2, 0).numpy())
    right.imshow(overlay(image, heat))
    left.set_title(name, fontsize=9)
    right.set_title(f"Grad-CAM: {title}", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
