"""cnnlab's own architectures, registered by name: fastnet, simple, lenet5, vgg11-small, resnet18-cifar."""

from __future__ import annotations

from typing import Sequence

import torch
import torchvision
from torch import nn

from .registry import register_model


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> list[nn.Module]:
    # Pool before the norm and activation: the same result as after, on a quarter of the pixels.
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers + [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FastNet(nn.Module):
    """A VGG-style net for small images, shaped for throughput on a CPU.

    Each stage is conv -> max-pool -> conv at the pooled size, so the expensive
    convolutions run at half resolution; there is no stem convolution, because on a
    2-core CPU a full-resolution stem costs about a third of the time for little accuracy.
    Global max-pooling makes it independent of the input size.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 dropout: float = 0.0, stem: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            # `stem`: the first convolution's width, when it differs from its stage's (e.g. one
            # filter pair per whitening component, --whiten)
            first = stem if i == 0 and stem else width
            layers += _conv_bn(c_in, first, pool=True) + _conv_bn(first, width)
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


@register_model("fastnet", "default: VGG-style conv-pool-conv stages, global max-pool; fast on CPUs")
def fastnet(in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
            dropout: float = 0.0, stem: int | None = None) -> nn.Module:
    return FastNet(in_channels, num_classes, tuple(widths), dropout, stem)


@register_model("simple", "the classic tutorial CNN: conv-pool-conv-pool-fc-fc")
def simple(in_channels: int, num_classes: int, hidden: int = 128, dropout: float = 0.25) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        # Adaptive pooling keeps the classic 7x7 grid of 28-pixel inputs for any image size.
        nn.AdaptiveAvgPool2d(7), nn.Flatten(),
        nn.Linear(64 * 7 * 7, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


@register_model("lenet5", "LeCun et al. 1998: two 5x5 conv + average-pool stages, fc 120-84")
def lenet5(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Tanh(),
        nn.Linear(120, 84), nn.Tanh(),
        nn.Linear(84, num_classes),
    )


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


@register_model("vgg11-small", "VGG-11 with batch norm at half width, four pools, for small images")
def vgg11_small(in_channels: int, num_classes: int, width: float = 0.5, dropout: float = 0.3) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in _VGG11:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = max(8, int(item * width))
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(c_in, num_classes))


@register_model("resnet18-cifar", "ResNet-18 with a 3x3 stride-1 stem and no max-pool (He et al., CIFAR variant)")
def resnet18_cifar(in_channels: int, num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class _FrozenScaleNorm(nn.BatchNorm2d):
    """Batch norm with its scale fixed at 1 and only the bias learnt; `momentum` as airbench states
    it (the weight of the old running statistics, 1 - PyTorch's)."""

    def __init__(self, channels: int, momentum: float):
        super().__init__(channels, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad_(False)


def _dirac_conv(c_in: int, c_out: int, dirac: bool) -> nn.Conv2d:
    # Identity init of the first c_in filters: the block starts close to passing its input
    # through, which airbench measured at 18 instead of 21 epochs to 94%.
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac:
        nn.init.dirac_(conv.weight.data[:min(c_in, c_out)])
    return conv


class _AirBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float, dirac: bool):
        super().__init__()
        self.conv1, self.pool = _dirac_conv(c_in, c_out, dirac), nn.MaxPool2d(2)
        self.norm1, self.conv2 = _FrozenScaleNorm(c_out, momentum), _dirac_conv(c_out, c_out, dirac)
        self.norm2, self.act = _FrozenScaleNorm(c_out, momentum), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """The network of airbench94 (Jordan, 2024), the CIFAR-10 speed record's: a 2x2 stem meant
    to be whitened (one +/- filter pair per patch component, --whiten), then three blocks of
    conv -> pool -> norm -> GELU -> conv -> norm -> GELU, global max-pool, a bias-free linear
    head whose logits are scaled down (`scale`, 1/9: softer outputs early in training)."""

    whiten_eps = 5e-4  # airbench's: the stem's 12 components are all kept, so little damping

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (64, 256, 256),
                 stem_kernel: int = 2, bn_momentum: float = 0.6, scale: float = 1 / 9, dirac: bool = True):
        super().__init__()
        stem = 2 * in_channels * stem_kernel ** 2
        self.stem = nn.Conv2d(in_channels, stem, stem_kernel, bias=True)
        self.act = nn.GELU()
        blocks, c_in = [], stem
        for width in widths:
            blocks.append(_AirBlock(c_in, width, bn_momentum, dirac))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.act(self.stem(x)))).flatten(1)
        return self.head(x) * self.scale


@register_model("airnet", "airbench94's CIFAR-10 network: whitened 2x2 stem, three conv-pool-conv blocks, "
                          "dirac init, scale-free batch norm")
def airnet(in_channels: int, num_classes: int, widths: Sequence[int] = (64, 256, 256), stem_kernel: int = 2,
           bn_momentum: float = 0.6, scale: float = 1 / 9, dirac: bool = True) -> nn.Module:
    return AirNet(in_channels, num_classes, tuple(widths), stem_kernel, bn_momentum, scale, dirac)
