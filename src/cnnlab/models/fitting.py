"""A model against the images it will get: lazy layers materialised with a dummy batch, and
shapes checked, before training or loading weights, so a misfit is one line and not a traceback."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..errors import CnnlabError, first_line


def has_lazy(model: nn.Module) -> bool:
    return any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules())


def check_fits(model: nn.Module, label: str, in_channels: int, image_size: tuple[int, int],
               num_classes: int) -> None:
    """Run two blank images through `model` (materialising lazy layers): the output must be
    (2, num_classes). A layer that refuses the input is named, with the shapes it expected and got."""
    device = next((p.device for p in model.parameters() if not _uninitialized(p)), torch.device("cpu"))
    x = torch.zeros(2, in_channels, *image_size, device=device)
    entered: list[tuple[str, nn.Module, tuple]] = []
    names = {m: n for n, m in model.named_modules()}

    def before(module: nn.Module, args: tuple) -> None:
        entered.append((names.get(module, "?"), module, args))

    def after(module: nn.Module, args: tuple, out: object) -> None:
        if entered and entered[-1][1] is module:
            entered.pop()

    hooks = [m.register_forward_pre_hook(before) for m in model.modules()]
    hooks += [m.register_forward_hook(after) for m in model.modules()]
    was_training = model.training
    model.eval()  # batch norm in training mode would also update its running statistics
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the user's forward: name the layer it failed in
        raise CnnlabError(_misfit(label, in_channels, image_size, entered, exc)) from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise CnnlabError(f"{label} returns a {type(out).__name__}, not a tensor of logits; "
                          "return one (N, classes) tensor from forward().")
    if out.shape != (2, num_classes):
        raise CnnlabError(f"{label} returns shape {list(out.shape)} for a batch of 2 images, but the data has "
                          f"{num_classes} classes: it must return (N, {num_classes}) logits (give it a num_classes "
                          "argument, or change its last layer).")


def _uninitialized(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _misfit(label: str, in_channels: int, image_size: tuple[int, int], entered: list, exc: Exception) -> str:
    data = f"{in_channels}x{image_size[0]}x{image_size[1]} images"
    # the innermost layer still running when the error rose
    leaf = next(((n, m, a) for n, m, a in reversed(entered) if not list(m.children())), None)
    if leaf is None:
        return f"{label} cannot take {data}: {type(exc).__name__}: {first_line(exc)}."
    name, module, args = leaf
    got = list(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
    kind = type(module).__name__
    if isinstance(module, nn.Linear) and got:
        return (f"{label} does not fit {data}: layer {name!r} ({kind}) expects {module.in_features} input "
                f"features but gets {got[-1]} (input shape {got}); size it for this data, or use nn.LazyLinear "
                "or adaptive pooling before it.")
    if isinstance(module, nn.Conv2d) and got:
        return (f"{label} does not fit {data}: layer {name!r} ({kind}) expects {module.in_channels} input "
                f"channel(s) but gets {got[1]} (input shape {got}); give it in_channels={in_channels} or convert the "
                "images.")
    shape = f" (input shape {got})" if got else ""
    return f"{label} does not fit {data}: layer {name!r} ({kind}) fails{shape}: {first_line(exc)}."

