"""The model registry and cnnlab's own architectures.

`create_model(name, in_channels, num_classes, **kwargs)` builds any registered network, or
any torchvision classification architecture as `tv:NAME`, untrained. Every model takes a
normalised float batch (N, C, H, W) of any reasonable size and returns logits (N, classes).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import CnnlabError, first_line

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn
    return wrap


def list_models() -> list[str]:
    """Names of cnnlab's own architectures (torchvision's are reachable as tv:NAME)."""
    return sorted(_MODELS)


def describe_model(name: str) -> str:
    return _DESCRIPTIONS[name]


def check_model_name(name: str) -> None:
    """Raise CnnlabError for a name that is neither registered nor a torchvision model."""
    if name.startswith("tv:"):
        available = torchvision.models.list_models(module=torchvision.models)
        if name[3:] not in available:
            raise CnnlabError(f"torchvision has no classification model {name[3:]!r}; "
                              f"try one of {', '.join(available[:8])}, ...")
    elif name not in _MODELS:
        raise CnnlabError(f"Unknown model {name!r}; choose one of {', '.join(list_models())} or tv:NAME.")


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an untrained model by registry name, or `tv:NAME` for a torchvision architecture."""
    check_model_name(name)
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], in_channels, num_classes, **kwargs)
    try:
        return _MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a negative width, a dropout above 1
        raise CnnlabError(f"Bad arguments for model {name!r}: {first_line(exc)}.") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def whiten_first_conv(model: nn.Module, batches: Iterable[torch.Tensor], eps: float = 1e-2) -> int:
    """Set the first convolution's filters to whitening filters of the images' patches, in
    +/- pairs, and freeze it (the first layer of the fastest CIFAR-10 training scripts).

    The filters are the eigenvectors of the patches' covariance scaled by 1/sqrt(eigenvalue +
    eps), largest components first when there are more than half the output channels; other
    filters keep their random start. `batches`: float image batches, normalised as training
    will see them (the covariance is summed batch by batch). Returns the number of filters set."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1 or isinstance(conv.padding, str):
        raise CnnlabError("--whiten needs a model whose first layer is an ordinary convolution.")
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
    for param in conv.parameters():
        param.requires_grad_(False)
    return 2 * pairs


def _torchvision_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CnnlabError(f"Cannot build tv:{name}: {first_line(exc)}.") from None
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution (in definition order) for one taking `in_channels` inputs."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))
            return
    raise CnnlabError(f"Cannot adapt this torchvision model to {in_channels} input channels.")
