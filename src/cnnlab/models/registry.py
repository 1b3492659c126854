"""The model registry: cnnlab's architectures by name, and torchvision's as tv:NAME.

`create_model(name, in_channels, num_classes, **kwargs)` builds any registered network, or
any torchvision classification architecture as `tv:NAME`, untrained. Every model takes a
normalised float batch (N, C, H, W) of any reasonable size and returns logits (N, classes).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torchvision
from torch import nn

from ..errors import CnnlabError, first_line
from ..registry import Registry


class ModelEntry(NamedTuple):
    build: Callable[..., nn.Module]  # build(in_channels=, num_classes=, **model_args)
    description: str


_MODELS: Registry[ModelEntry] = Registry("model", also="tv:NAME", sort=True)


def register_model(name: str, description: str) -> Callable:
    """Decorator: register a builder taking in_channels, num_classes and keyword arguments."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.register(name, ModelEntry(fn, description))
        return fn
    return wrap


def list_models() -> list[str]:
    """Names of cnnlab's own architectures (torchvision's are reachable as tv:NAME)."""
    return _MODELS.names()


def describe_model(name: str) -> str:
    return _MODELS.get(name).description


def check_model_name(name: str) -> None:
    """Raise CnnlabError for a name that is neither registered nor a torchvision model."""
    if name.startswith("tv:"):
        available = torchvision.models.list_models(module=torchvision.models)
        if name[3:] not in available:
            raise CnnlabError(f"torchvision has no classification model {name[3:]!r}; "
                              f"try one of {', '.join(available[:8])}, ...")
    else:
        _MODELS.get(name)


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an untrained model by registry name, or `tv:NAME` for a torchvision architecture."""
    check_model_name(name)
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], in_channels, num_classes, **kwargs)
    try:
        return _MODELS.get(name).build(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a negative width, a dropout above 1
        raise CnnlabError(f"Bad arguments for model {name!r}: {first_line(exc)}.") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
