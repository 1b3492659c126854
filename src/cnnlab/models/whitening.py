"""A frozen first layer of whitening filters (`--whiten`), from the training images' patches."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidSetting


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's first convolution (the one --whiten sets), or None."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def whiten_first_conv(model: nn.Module, batches: Iterable[torch.Tensor], eps: float | None = None,
                      train_bias: bool = False) -> int:
    """Set the first convolution's filters to whitening filters of the images' patches, in
    +/- pairs, and freeze it (the first layer of the fastest CIFAR-10 training scripts).

    The filters are the eigenvectors of the patches' covariance scaled by 1/sqrt(eigenvalue +
    eps), largest components first when there are more than half the output channels; other
    filters keep their random start. `batches`: float image batches, normalised as training
    will see them (the covariance is summed batch by batch). `eps` defaults to the model's
    `whiten_eps` attribute, else 1e-2. `train_bias`: the bias stays trainable (it starts at zero).
    Returns the number of filters set."""
    conv = first_conv(model)
    eps = getattr(model, "whiten_eps", 1e-2) if eps is None else eps
    if conv is None or conv.groups != 1 or isinstance(conv.padding, str):
        raise InvalidSetting("whiten", "needs a model whose first layer is an ordinary convolution.")
    size = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    cov, count = torch.zeros(size, size, dtype=torch.float64), 0
    for images in batches:
        patches = F.unfold(images.float().contiguous(), conv.kernel_size, dilation=conv.dilation,
                           padding=conv.padding, stride=conv.stride)
        patches = patches.transpose(1, 2).reshape(-1, size).double().cpu()
        cov += patches.T @ patches
        count += len(patches)
    values, vectors = torch.linalg.eigh(cov / max(count, 1))  # ascending
    filters = (vectors / (values.clamp_min(0) + eps).sqrt()).T.float()
    pairs = min(size, conv.out_channels // 2)
    chosen = filters[-pairs:].reshape(pairs, *conv.weight.shape[1:]).to(conv.weight.device)
    with torch.no_grad():
        conv.weight[:pairs] = chosen
        conv.weight[pairs:2 * pairs] = -chosen
        if conv.bias is not None:
            conv.bias.zero_()
    conv.weight.requires_grad_(False)
    if conv.bias is not None:
        conv.bias.requires_grad_(train_bias)
    return 2 * pairs
