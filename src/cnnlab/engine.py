"""One training epoch and one evaluation pass: the loop, kept short enough to read at once."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import BatchLoader


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images: int

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the given device, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, *,
                    bf16: bool, epoch: int, ema: torch.optim.swa_utils.AveragedModel | None = None,
                    progress: bool = True) -> EpochStats:
    model.train()
    device = loader.normalize.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, file=sys.stderr, leave=False)
    for step, (images, labels) in enumerate(bar):
        # forward / backward / step
        with autocast(device, bf16):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        # running totals stay on the device: no synchronisation per step
        total_loss += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if progress and step % 10 == 0:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{rate:.0f}", refresh=False)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return EpochStats(total_loss.item() / max(seen, 1), correct.item() / max(seen, 1),
                      time.perf_counter() - start, seen)


TTA_MODES = ("none", "flip", "flip-translate")


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none", flip: bool = True) -> torch.Tensor:
    """Average logits over test-time views: the image, its mirror (when flips are label-safe),
    and, for flip-translate, the views shifted one pixel up-left and down-right."""
    views = [x]
    if tta in ("flip", "flip-translate") and flip:
        views.append(x.flip(3))
    if tta == "flip-translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        views += shifted + ([v.flip(3) for v in shifted] if flip else [])
    if len(views) == 1:
        return model(x).float()
    batch = torch.cat(views).contiguous(memory_format=torch.channels_last)
    return model(batch).float().view(len(views), len(x), -1).mean(0)


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: BatchLoader, *, bf16: bool, tta: str = "none",
                   flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for every image the loader yields, in order."""
    model.eval()
    device = loader.normalize.device
    all_logits, all_labels = [], []
    for images, labels in loader:
        with autocast(device, bf16):
            logits = tta_logits(model, images, tta, flip)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
