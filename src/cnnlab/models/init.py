"""Starting a model from trained weights: a previous run's (`init_from_run`) or torchvision's
ImageNet weights (`pretrained_torchvision`), with a fresh classifier head where the classes differ."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
from http.client import HTTPException
from pathlib import Path
from typing import Any, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ..errors import CnnlabError, InvalidSetting, first_line
from ..rundir import RunDir
from .registry import _replace_first_conv, check_model_name

# seconds one socket operation of a weights download may wait; torch.hub sets no limit, so a
# network that drops packets instead of refusing them would stall the start of training for good
DOWNLOAD_TIMEOUT_S = 30.0


def init_from_run(model: nn.Module, run_dir: str | Path, *, architecture: str, model_args: dict[str, Any],
                  in_channels: int, class_names: list[str]) -> str:
    """Copy a finished run's weights into `model`, freshly built as `architecture` with
    `model_args`, `in_channels` and one output per class name; returns what was done, in one line.

    With the run's classes (names and order) every tensor is loaded; with other classes the
    classifier head keeps its fresh initialisation, since its rows stand for the run's classes."""
    run = RunDir(run_dir)
    card = run.read_card()
    if architecture != card.architecture:
        raise InvalidSetting("model", f"is {architecture}, but {run} was trained as {card.architecture}; "
                                      f"set it to {card.architecture} to start from that run's weights.")
    if _as_json(model_args) != _as_json(card.model_args):
        differ = sorted(key for key in {**model_args, **card.model_args}
                        if _as_json(model_args.get(key)) != _as_json(card.model_args.get(key)))
        raise InvalidSetting("model_args", f"differ from those {run} was trained with in {', '.join(differ)}; "
                                           f"set them to {card.model_args} to start from that run's weights.")
    if in_channels != card.in_channels:
        raise CnnlabError(f"{run} was trained on {card.in_channels}-channel images and these have {in_channels}; "
                          f"start from a run trained on {in_channels}-channel images, or from scratch.")
    state = run.read_weights(card)
    expected = model.state_dict()
    misfit = f"{run / run.WEIGHTS} does not fit {architecture} as this cnnlab builds it"
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CnnlabError(f"{misfit} ({len(missing)} tensor(s) missing, {len(unexpected)} unexpected, e.g. "
                          f"{(missing + unexpected)[0]!r}); it was written by another cnnlab version or changed.")
    same_classes = list(class_names) == list(card.class_names)
    heads = set() if same_classes else set(_output_layers(model))
    head = [name for name in expected if name.rpartition(".")[0] in heads]
    for name, tensor in expected.items():
        if name not in head and state[name].shape != tensor.shape:
            raise CnnlabError(f"{misfit} ({name!r} has shape {list(state[name].shape)} there, the model needs "
                              f"{list(tensor.shape)}); it was written by another cnnlab version or changed.")
    model.load_state_dict({name: t for name, t in state.items() if name not in head}, strict=same_classes)
    if same_classes:
        return f"initialised from {run} ({architecture}): all {len(state)} tensors"
    change = (f"{card.num_classes} -> {len(class_names)} classes" if len(class_names) != card.num_classes
              else f"the {len(class_names)} classes differ in name or order")
    return (f"initialised from {run} ({architecture}): {len(expected) - len(head)} of {len(expected)} tensors; "
            f"the classifier head {', '.join(head)} is new ({change})")


def pretrained_torchvision(name: str, in_channels: int, num_classes: int,
                           **kwargs: Any) -> tuple[nn.Module, list[float] | None, list[float] | None]:
    """torchvision's `name` (tv: prefix optional) with its default pretrained weights, adapted by
    `adapt_pretrained`; returns it with the mean and std the weights were trained with, per input channel.

    The weights come from torch.hub's cache (torch.hub.get_dir()/checkpoints, under $TORCH_HOME),
    downloaded there when missing."""
    name = name.removeprefix("tv:")
    check_model_name(f"tv:{name}")
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise InvalidSetting("pretrained", f"is not available for tv:{name}: torchvision has no weights for it; "
                                           "train it from scratch.") from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(urlparse(weights.url).path)  # where torch.hub keeps it
    cached = path.is_file()
    try:
        with _socket_timeout(None if cached else DOWNLOAD_TIMEOUT_S):
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (TypeError, ValueError) as exc:  # arguments the weights do not allow, e.g. another image_size
        problem = first_line(exc).rstrip(".")
        raise CnnlabError(f"Cannot build tv:{name} with its pretrained weights: {problem}.") from None
    except (OSError, HTTPException) as exc:  # urllib wraps every network failure in URLError, an OSError
        if cached:
            raise InvalidSetting("pretrained", f"needs {path}, which cannot be read "
                                               f"({getattr(exc, 'strerror', None) or first_line(exc)}).") from None
        raise InvalidSetting("pretrained", f"needs tv:{name}'s weights, which are not in {folder} ({path.name}) and "
                                           f"cannot be downloaded ({_why_not(exc)}); copy the file there or train "
                                           "without them.") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # a damaged file, or a download's bad hash
        if cached:
            raise InvalidSetting("pretrained", f"needs {path}, which is damaged ({first_line(exc)}); delete it "
                                               "to download it again.") from None
        raise InvalidSetting("pretrained", f"needs tv:{name}'s weights, whose download into {folder} was damaged "
                                           f"({first_line(exc)}); try again.") from None
    adapt_pretrained(model, in_channels, num_classes)
    return (model, *pretrained_normalisation(name, in_channels))


def pretrained_normalisation(name: str, in_channels: int) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std torchvision's default weights for `name` were trained with, per input
    channel (None where the weights do not say); known without downloading anything."""
    try:
        transforms = torchvision.models.get_model_weights(name.removeprefix("tv:")).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return None, None
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    return _per_channel(mean, in_channels), _per_channel(std, in_channels)


def adapt_pretrained(model: nn.Module, in_channels: int, num_classes: int) -> nn.Module:
    """Give an RGB-trained classifier a fresh head for `num_classes` and, when `in_channels` is
    not 3, a first convolution for that many channels that keeps the trained filters; in place."""
    for name in _output_layers(model):
        old = model.get_submodule(name)
        bias = old.bias is not None
        new = (nn.Linear(old.in_features, num_classes, bias=bias) if isinstance(old, nn.Linear) else
               nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=bias))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new.to(old.weight.device, old.weight.dtype))
    if in_channels != 3:
        rgb = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        _replace_first_conv(model, in_channels)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.to(rgb.weight.device, rgb.weight.dtype)
            conv.weight.copy_(_fold_channels(rgb.weight, in_channels))
            if rgb.bias is not None:
                conv.bias.copy_(rgb.bias)
    return model


def _output_layers(model: nn.Module) -> list[str]:
    """The layers that produce class scores: the last nn.Linear (the last nn.Conv2d in a model
    without one, as squeezenet), and earlier ones of its width (googlenet's and inception's
    auxiliary heads). True of every torchvision classifier."""
    layers = ([(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)] or
              [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)])
    if not layers:
        raise CnnlabError(f"{type(model).__name__} has no linear or convolution layer to serve as its classifier head.")

    def width(layer: nn.Module) -> int:
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    last = width(layers[-1][1])
    return [name for name, layer in layers if width(layer) == last]


def _fold_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters (out, 3, kh, kw) for `in_channels` inputs. One channel gets their sum, which
    answers a grey image exactly as the RGB filters answer it repeated in all three channels;
    other counts repeat the three and rescale, keeping the output's size."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _per_channel(values: Any, in_channels: int) -> list[float] | None:
    """The weights' RGB mean or std for `in_channels` inputs: the average where the filters were folded."""
    if values is None:
        return None
    values = [float(v) for v in values]
    return values if len(values) == in_channels else [sum(values) / len(values)] * in_channels


def _why_not(exc: OSError | HTTPException) -> str:
    """Why a download failed, in a few words."""
    if isinstance(exc, HTTPError):  # the server answered: its status says why
        return first_line(exc)
    reason = exc.reason if isinstance(exc, URLError) else exc
    if isinstance(reason, (socket.gaierror, TimeoutError, ConnectionError)):
        return "no network"
    return reason if isinstance(reason, str) else (getattr(reason, "strerror", None) or first_line(reason))


@contextlib.contextmanager
def _socket_timeout(seconds: float | None) -> Iterator[None]:
    """Sockets opened meanwhile, in any thread, give up after `seconds` of silence, unless a
    limit is set already (torch.hub's download takes no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    if seconds is not None and previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _as_json(value: Any) -> Any:
    """`value` as model.json holds it (tuples as lists), so arguments compare with the card's."""
    return json.loads(json.dumps(value, default=str))
