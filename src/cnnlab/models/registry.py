"""The model registry: cnnlab's architectures by name, torchvision's as tv:NAME, packages' through
the `cnnlab.models` entry-point group, and a user's own as path/to/file.py:Name or module:Name.

`create_model(name, in_channels, num_classes, **kwargs)` builds any of them, untrained. Every
model takes a normalised float batch (N, C, H, W) and returns logits (N, classes).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, NamedTuple

import torchvision
from torch import nn

from ..card import ModelCard
from ..errors import CnnlabError, InvalidSetting, first_line
from ..registry import Registry
from . import source as user_source
from .fitting import check_fits, has_lazy

ENTRY_POINT_GROUP = "cnnlab.models"  # packages register models for every command under this group


class ModelEntry(NamedTuple):
    build: Callable[..., nn.Module]  # build(in_channels=, num_classes=, **model_args)
    description: str


_MODELS: Registry[ModelEntry] = Registry("model", also="tv:NAME or path/to/file.py:Name", sort=True)
_entry_points_read = False


def register_model(name: str, description: str) -> Callable:
    """Decorator: register a builder taking in_channels, num_classes and keyword arguments."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.register(name, ModelEntry(fn, description))
        return fn
    return wrap


def list_models() -> list[str]:
    """Names of cnnlab's own architectures and those packages register (torchvision's are
    reachable as tv:NAME)."""
    _read_entry_points()
    return _MODELS.names()


def _read_entry_points() -> None:
    """Register the models installed packages declare under ENTRY_POINT_GROUP (once per process;
    each is imported only when it is built)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _MODELS:
            continue
        dist = getattr(point.dist, "name", None)
        _MODELS.register(point.name, ModelEntry(_entry_point_builder(point), f"{point.value}"
                                                + (f" (from {dist})" if dist else "")))


def _entry_point_builder(point: Any) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
        try:
            obj = point.load()
        except Exception as exc:  # another package's code
            raise CnnlabError(f"Cannot load model {point.name!r} ({point.value}): "
                              f"{type(exc).__name__}: {first_line(exc)}.") from None
        return user_source.build(obj, in_channels, num_classes, kwargs, point.name)
    return build


def describe_model(name: str) -> str:
    return _MODELS.get(name).description


def check_model_name(name: str) -> None:
    """Raise CnnlabError for a name that is neither registered nor a torchvision model, or an
    import path that does not import."""
    if user_source.is_import_path(name):
        user_source.resolve(name)
    elif name.startswith("tv:"):
        available = torchvision.models.list_models(module=torchvision.models)
        if name[3:] not in available:
            raise CnnlabError(f"torchvision has no classification model {name[3:]!r}; "
                              f"try one of {', '.join(available[:8])}, ...")
    else:
        _read_entry_points()
        _MODELS.get(name)


def recorded_name(name: str) -> str:
    """What a run records for `name`, so that a fresh process can build the model: the name
    itself, except for a model registered at run time by the user's own code (register_model),
    which a later `cnnlab evaluate` would not know: that is recorded by its import path. A file
    path is made absolute, since later commands run from anywhere."""
    if user_source.is_import_path(name):
        return user_source.resolve(name)[0].spec
    if name not in _MODELS or is_builtin(name):
        return name
    build = _MODELS.get(name).build
    if build.__module__ == __name__:  # an entry point's builder: found again by its name
        return name
    return user_source.source_of(build).spec


def is_builtin(name: str) -> bool:
    """One of cnnlab's own architectures (models/nets.py), which the recipes are tuned for."""
    return name in _MODELS and _MODELS.get(name).build.__module__ == f"{__package__}.nets"


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build an untrained model by registry name, `tv:NAME` for a torchvision architecture, or
    path/to/file.py:Name or package.module:Name for a class or factory of the user's."""
    if user_source.is_import_path(name):
        _, obj = user_source.resolve(name)
        return user_source.build(obj, in_channels, num_classes, kwargs, name.rpartition(":")[2])
    check_model_name(name)
    if name.startswith("tv:"):
        return _torchvision_model(name[3:], in_channels, num_classes, **kwargs)
    try:
        return _MODELS.get(name).build(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a negative width, a dropout above 1
        raise CnnlabError(f"Bad arguments for model {name!r}: {first_line(exc)}.") from None


def model_from_card(card: ModelCard, where: str) -> nn.Module:
    """The untrained model a model card describes, built in this process (lazy layers
    materialised at the card's image size), ready for its weights. `where` names the card in errors."""
    if user_source.is_import_path(card.architecture):
        obj = user_source.load_recorded(card.architecture, card.source_sha256, where)
        model = user_source.build(obj, card.in_channels, card.num_classes, card.model_args,
                                  card.architecture.rpartition(":")[2])
    else:
        model = create_model(card.architecture, card.in_channels, card.num_classes, **card.model_args)
    if has_lazy(model):
        check_fits(model, card.architecture, card.in_channels, card.image_size, card.num_classes)
    return model


def check_rebuilds(model: nn.Module, architecture: str, model_args: dict, in_channels: int,
                   image_size: tuple[int, int], num_classes: int) -> None:
    """A model instance whose run later commands will rebuild from `architecture` and
    `model_args`: the rebuilt model must hold the same tensors, or the run could not be loaded."""
    rebuilt = create_model(architecture, in_channels, num_classes, **model_args)
    check_fits(rebuilt, architecture, in_channels, image_size, num_classes)
    mine, theirs = model.state_dict(), rebuilt.state_dict()
    differ = sorted(k for k in mine.keys() | theirs.keys()
                    if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
    if differ:
        raise InvalidSetting("model", f"is an instance that {architecture} with model_args {model_args or '{}'} "
                                      f"does not rebuild (e.g. {differ[0]!r} differs), and later commands rebuild it "
                                      "that way; pass the class and its arguments instead (model=Net, "
                                      "model_args={...}).")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


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
