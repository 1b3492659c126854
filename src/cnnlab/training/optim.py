"""What the optimiser steps: the parameter groups and their rates, the learning-rate schedule,
Muon, and the two weight averages (an EMA beside the model, lookahead inside it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.whitening import first_conv
from .config import TrainConfig

LR_BATCH = 256  # TrainConfig.lr is the rate per this many images; the optimiser's scales with the batch
WHITEN_BIAS = "whiten_bias"  # the group of the whitened layer's bias, trained for config.whiten_bias_epochs
# Muon's filters: the step at the schedule's peak and its momentum, airbench94_muon's at its batch
# of 2000 (MUON_BATCH); scaled linearly with the batch like the other rates. Unscaled at batch 512
# (4x the steps) the filters moved too far: 68.4% after 4 of 8 epochs against SGD's 80.4%.
MUON_LR = 0.24
MUON_BATCH = 2000
MUON_MOMENTUM = 0.6


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """config.optimizer at `lr` (per LR_BATCH images; default config.lr), scaled to config.batch_size."""
    lr = (config.lr if lr is None else lr) * config.batch_size / LR_BATCH
    groups = _param_groups(model, config, lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(config.momentum, 0.999))
    if config.optimizer == "muon":
        return Muon(groups, lr=lr, momentum=config.momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)


def _param_groups(model: nn.Module, config: TrainConfig, lr: float) -> list[dict]:
    """Weights decayed; norm weights and other biases not (shrinking them only fights batch norm).
    Batch-norm biases at lr * bias_lr_scale, decayed as much per step as the weights when scaled
    (airbench's setting: a 64x rate saved 4.5 of its 18 epochs to 94%)."""
    # frozen parameters (a whitened layer's filters) stay in their group, as they always have:
    # they get no gradient, so no step, and checkpoints keep their group sizes
    every = list(model.parameters())
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                   and m.bias is not None and m.bias.requires_grad] if config.bias_lr_scale != 1 else []
    conv = first_conv(model)
    whiten_bias = [conv.bias] if (config.whiten and config.whiten_bias_epochs and conv is not None
                                  and conv.bias is not None and conv.bias.requires_grad) else []
    special = {id(p) for p in norm_biases + whiten_bias}
    rest = [p for p in every if id(p) not in special]
    filters = [p for p in rest if p.ndim == 4] if config.optimizer == "muon" else []
    decay = [p for p in rest if p.ndim > 1 and not (filters and p.ndim == 4)]
    muon_lr = MUON_LR * config.batch_size / MUON_BATCH
    groups = [{"params": filters, "lr": muon_lr, "momentum": MUON_MOMENTUM, "muon": True},
              {"params": decay, "weight_decay": config.weight_decay},
              {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0}]
    if norm_biases:
        groups.append({"params": norm_biases, "lr": lr * config.bias_lr_scale,
                       "weight_decay": config.weight_decay / config.bias_lr_scale})
    if whiten_bias:
        groups.append({"params": whiten_bias, "weight_decay": 0.0, "name": WHITEN_BIAS})
    return [g for g in groups if g["params"]]


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warm-up from 1/10 of the peak, then linear/cosine decay to
    config.lr_end. The whitened layer's bias stops after config.whiten_bias_epochs."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    end = config.lr_end

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        return end + (1 - end) * (1 - progress)

    stop = config.whiten_bias_epochs * steps_per_epoch

    def whiten_bias(step: int) -> float:
        return factor(step) if step < stop else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [whiten_bias if g.get("name") == WHITEN_BIAS else factor for g in optimizer.param_groups])


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for the group marked `muon` (the convolution filters), Nesterov
    SGD for the others. Each filter bank's Nesterov momentum is orthogonalised by a Newton-Schulz
    iteration on its (out, in * k * k) matrix, and the weights are kept at a fixed norm.
    torch.optim.Muon takes 2-D parameters only, so the 4-D filters need this one."""

    def __init__(self, params: list[dict], lr: float, momentum: float = 0.9, ns_steps: int = 3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not group["muon"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum)  # Nesterov
                if group["muon"]:
                    p.mul_(math.sqrt(len(p)) / p.norm().clamp_min(1e-12))  # fixed norm: decay is not needed
                    update = _orthogonalise(update.reshape(len(p), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-group["lr"])


def _orthogonalise(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g, roughly: quintic Newton-Schulz in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Lookahead:
    """Lookahead as airbench94 uses it: every `every` steps the weights (and batch-norm statistics)
    move to a slow average, which first follows them closely and then, with a decay of
    0.95**5 * (t/T)**3, ever less; the last step ends on the average."""

    def __init__(self, model: nn.Module, every: int, total_steps: int):
        self.model, self.every, self.total = model, every, max(1, total_steps)
        self.steps = 0
        self.slow = [t.detach().clone() for t in self._tensors()]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps % self.every and self.steps < self.total:
            return
        decay = 1.0 if self.steps >= self.total else 0.95 ** 5 * (self.steps / self.total) ** 3
        current = self._tensors()
        torch._foreach_lerp_(self.slow, current, 1 - decay)
        torch._foreach_copy_(current, self.slow)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "slow": [t.clone() for t in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for mine, saved in zip(self.slow, state["slow"]):
            mine.copy_(saved)


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as (1 + n) / (10 + n) towards `decay`: without the ramp the
    random initial weights linger in the average for hundreds of steps."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        pairs = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as num_batches_tracked
                a.copy_(c)
    return update
