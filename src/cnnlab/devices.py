"""Devices and precision: which device a run uses, whether bf16 is native there, and autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import InvalidSetting


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidSetting("device", "cuda was asked for, but PyTorch sees no CUDA GPU; use cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidSetting("device", "mps was asked for, but this machine has no Apple GPU; use cpu.")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast runs on native hardware (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the given device, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
