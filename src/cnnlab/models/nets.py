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
