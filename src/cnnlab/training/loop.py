"""One training epoch and one evaluation pass: the loop, kept short enough to read at once."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..data.batches import BatchLoader
from ..devices import autocast
from ..errors import CnnlabError
from ..images.spec import DEFAULT_TTA
from ..images.tensors import tta_logits
from .optim import Lookahead


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images: int

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Totals:
    """Running sums of an epoch in progress: saved in mid-epoch checkpoints, so a resumed epoch
    reports the same loss and accuracy as an uninterrupted one."""
    loss: torch.Tensor  # summed over images, on the training device
    correct: torch.Tensor
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def zero(cls, device: torch.device) -> "Totals":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64))

    def stats(self) -> EpochStats:
        seen = max(self.seen, 1)
        return EpochStats(self.loss.item() / seen, self.correct.item() / seen, self.seconds, self.seen)


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, *,
                    bf16: bool, epoch: int, ema: torch.optim.swa_utils.AveragedModel | None = None,
                    lookahead: Lookahead | None = None,
                    progress: bool = True, start: int = 0, totals: Totals | None = None,
                    after_step: Callable[[int, Totals], None] | None = None) -> EpochStats:
    """Train one pass over `loader` from batch `start` (non-zero when resuming), adding to
    `totals`; `after_step(step, totals)` runs after every optimiser step (checkpoints)."""
    model.train()
    device = loader.normalize.device
    totals = totals or Totals.zero(device)
    # NaN checks synchronise; on a GPU check every few steps (a checkpoint always checks first)
    check_every = 1 if device.type == "cpu" else 25
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, file=sys.stderr, leave=False,
               initial=start, total=len(loader))
    mark = time.perf_counter()
    for step, (images, labels) in enumerate(bar, start=start):
        # forward / backward / step
        with autocast(device, bf16):
            logits = model(images)
            loss = loss_fn(logits, labels)
        if step % check_every == 0 and not torch.isfinite(loss):
            raise TrainingDiverged(f"The loss became {loss.item()} at epoch {epoch}, batch {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        if lookahead is not None:
            lookahead.step()
        # running totals stay on the device: no synchronisation per step
        totals.loss += loss.detach() * len(labels)
        totals.correct += (logits.argmax(1) == labels).sum()
        totals.seen += len(labels)
        totals.seconds += time.perf_counter() - mark
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{totals.loss.item() / totals.seen:.3f}",
                            acc=f"{totals.correct.item() / totals.seen:.3f}",
                            img_s=f"{totals.seen / max(totals.seconds, 1e-9):.0f}", refresh=False)
        if after_step is not None:
            after_step(step, totals)
        mark = time.perf_counter()  # checkpoint writing is not training time
    bar.close()
    if device.type == "cuda":  # the last steps may still be running
        torch.cuda.synchronize()
        totals.seconds += time.perf_counter() - mark
    return totals.stats()


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: BatchLoader, *, bf16: bool, tta: str = DEFAULT_TTA,
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
