"""The learning-rate range test (Smith 2015, as popularised by fastai): `lr_find(config)`.

A fresh model trains for a few steps while the learning rate grows exponentially; the
smoothed loss against the rate is plotted and `suggest_lr` picks a rate from the curve.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from ..data.batches import BatchLoader
from ..devices import autocast
from ..errors import CnnlabError, InvalidSetting
from .config import TrainConfig
from .optim import make_optimizer
from .setup import build_setup
from .trainer import default_run_dir

DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
LAG = 0.04  # lag of the loss smoothing, as a fraction of the sweep (0.2 decades over 1e-4..10)
SUGGESTION_RULE = ("steepest fall of the smoothed loss per decade of learning rate, among rates below the "
                   "loss minimum whose loss is already below the lowest of the sweep's first tenth, "
                   "and at most a tenth of the rate at the minimum")


@dataclass
class LRFindResult:
    suggestion: float  # per 256 images, as TrainConfig.lr
    rule: str
    lrs: list[float]  # per 256 images, one per step taken
    losses: list[float]  # smoothed training loss after each step
    plot: Path


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A learning rate from a range test's (rate, smoothed loss) curve; the rule is SUGGESTION_RULE.

    The steepest fall is where training makes the most progress per step (Smith 2015, fastai's
    "steep"). Searching only below the minimum keeps the divergence out. Searching only where
    the loss is below its early level keeps out the recovery after an early spike, which is
    steep but is not progress. The cap at a tenth of the minimum's rate (fastai's "minimum")
    stays clear of the rates where the loss turns up, where noise can put the steepest point.
    """
    lrs_, losses_ = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if len(lrs_) != len(losses_) or len(lrs_) < 3:
        raise CnnlabError("The learning-rate range test needs at least 3 steps to suggest a rate; "
                          "raise steps or lower min_lr.")
    lowest = int(np.argmin(losses_))
    early = float(losses_[:max(1, len(losses_) // 10)].min())
    slope = np.gradient(losses_, np.log10(lrs_))  # loss change per decade
    falling = [i for i in range(lowest + 1) if losses_[i] < early and slope[i] < 0]
    cap = lrs_[lowest] / 10
    steepest = lrs_[min(falling, key=lambda i: slope[i])] if falling else cap
    return float(max(lrs_[0], min(steepest, cap)))


def lr_find(config: TrainConfig, min_lr: float = 1e-4, max_lr: float = 10.0, steps: int = 100,
            out: str | Path | None = None) -> LRFindResult:
    """Run the range test for the model, data, batch size, optimiser and augmentation of `config`.

    Learning rates are per 256 images, as TrainConfig.lr (the optimiser gets lr * batch / 256).
    The rate grows from min_lr to max_lr over `steps` steps; the test stops early once the
    smoothed loss exceeds 4x its minimum. The plot goes to `out`, else CONFIG.OUT/lr_find.png,
    else runs/lr-find-<dataset>-<model>-<time>/lr_find.png; lr_find.json beside it holds the curve.
    """
    _check(min_lr, max_lr, steps)
    setup = build_setup(config)  # the model (whitened where training's is) and batches `train` starts from
    config = setup.config  # with the batch size chosen for the data
    lrs, losses = _sweep(setup.model, setup.data.train_loader, config, min_lr, max_lr, steps, setup.bf16)
    suggestion = suggest_lr(lrs, losses)
    plot = _output_path(config, out)
    _save(plot, lrs, losses, suggestion, config)
    return LRFindResult(suggestion, SUGGESTION_RULE, lrs, losses, plot)


def _check(min_lr: float, max_lr: float, steps: int) -> None:
    if not 0 < min_lr < max_lr:
        raise InvalidSetting("min_lr", f"must be positive and below max_lr, got {min_lr:g} and {max_lr:g}.")
    if steps < 5:
        raise InvalidSetting("steps", f"must be at least 5, got {steps}.")


def _endless(loader: BatchLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # a new shuffled epoch whenever one runs out
        yield from loader


def _sweep(model: nn.Module, loader: BatchLoader, config: TrainConfig, min_lr: float, max_lr: float,
           steps: int, bf16: bool) -> tuple[list[float], list[float]]:
    """Train with an exponentially growing rate; (rates, smoothed losses) until the loss diverges."""
    growth = (max_lr / min_lr) ** (1 / (steps - 1))
    optimizer = make_optimizer(model, config, lr=min_lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=growth)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # Exponential moving average with bias correction; a fixed lag in steps would shift the
    # curve by more decades the shorter the sweep, so the lag is a fixed share of it.
    lag = LAG * steps
    beta = lag / (1 + lag)
    average, lrs, losses = 0.0, [], []
    model.train()
    bar = tqdm(range(steps), desc="lr-find", unit="step", disable=not config.progress, file=sys.stderr, leave=False)
    for step, (images, labels) in zip(bar, _endless(loader)):
        with autocast(loader.normalize.device, bf16):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        average = beta * average + (1 - beta) * value
        lrs.append(min_lr * growth ** step)
        losses.append(average / (1 - beta ** (step + 1)))
        if losses[-1] > DIVERGED * min(losses):
            break
    bar.close()
    return lrs, losses


def _output_path(config: TrainConfig, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    if config.out:
        return Path(config.out) / "lr_find.png"
    run_dir = default_run_dir(config)
    return run_dir.with_name(f"lr-find-{run_dir.name}") / "lr_find.png"


def _save(plot: Path, lrs: list[float], losses: list[float], suggestion: float, config: TrainConfig) -> None:
    """The plot (log-scaled rate, suggestion and minimum marked) and the curve as JSON beside it."""
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="#1f77b4")
    ax.set_xscale("log")
    lowest = int(np.argmin(losses))
    ax.plot([lrs[lowest]], [losses[lowest]], "o", color="#7f7f7f", label=f"minimum at {lrs[lowest]:.3g}")
    ax.axvline(suggestion, color="#d62728", linestyle="--", label=f"suggestion {suggestion:.3g}")
    ax.set_xlabel(f"learning rate per 256 images (batch {config.batch_size}, {config.optimizer})")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"learning-rate range test: {config.model} on {config.dataset}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(plot, dpi=100)
    record = {"suggestion": suggestion, "rule": SUGGESTION_RULE, "lrs": lrs, "losses": losses,
              "model": config.model, "dataset": config.dataset, "batch_size": config.batch_size}
    plot.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
