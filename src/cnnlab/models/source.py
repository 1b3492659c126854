"""A user's own model, given by import path (`path/to/net.py:Name` or `package.module:Name`) or
as a Python class, factory or instance, and how a later process builds the same model again.

The model card records the import path and the sha256 of the file that defines the model, so
evaluate, predict, serve, export and report rebuild it in a fresh process. That imports the
user's code (the weights stay safetensors); a file that changed or vanished is one clear error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import CnnlabError, first_line
from ..files import sha256_file

# modules this process loaded from a file path, by the name they were given in sys.modules
_LOADED_FILES: dict[str, Path] = {}


def is_import_path(name: str) -> bool:
    """`file.py:Name` or `package.module:Name` (not a registered name, not tv:NAME)."""
    return ":" in name and not name.startswith("tv:")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's code lives: what `--model` and the model card's `architecture` hold."""
    spec: str  # "/abs/path/net.py:Net" or "package.module:Net"
    sha256: str | None  # of the file that defines it; None where there is no file

    @property
    def target(self) -> str:
        return self.spec.rpartition(":")[0]

    @property
    def name(self) -> str:
        return self.spec.rpartition(":")[2]

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py") or os.sep in self.target or "/" in self.target


def resolve(spec: str) -> tuple[ModelSource, Any]:
    """The object an import path names, with its source; a file path is made absolute."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise CnnlabError(f"--model {spec!r} is not an import path; write path/to/file.py:Name or package.module:Name.")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        module = _import_file(path)
        source = ModelSource(f"{path}:{name}", sha256_file(path))
    else:
        module = _import_module(target)
        file = getattr(module, "__file__", None)
        source = ModelSource(f"{target}:{name}", sha256_file(Path(file)) if file else None)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(k for k, v in vars(module).items()
                             if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v)))
            has = ", ".join(defined[:10]) or "no classes or functions"
            raise CnnlabError(f"{target} defines no {name!r}; it has {has}.")
        obj = getattr(obj, part)
    # Only an nn.Module class or a Python function: a model card cannot name just any callable
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)) and not inspect.isfunction(obj):
        raise CnnlabError(f"{source.spec} is not a torch.nn.Module class or a function that builds one.")
    return source, obj


def load_recorded(spec: str, sha256: str | None, where: str) -> Any:
    """The model class or factory a model card records, after checking that its file is the one
    the weights were trained with. `where` names the card in errors."""
    target = spec.rpartition(":")[0]
    if (target.endswith(".py") or "/" in target) and not Path(target).is_file():
        raise CnnlabError(f"The model's source {target} (recorded in {where}) no longer exists; put it back "
                          "at that path to use this run.")
    if not sha256:
        raise CnnlabError(f"{where} names the model {spec} without the sha256 of its source; the run directory "
                          "is damaged or was not written by cnnlab.")
    source, obj = resolve(spec)
    if source.sha256 != sha256:
        raise CnnlabError(f"The model's source {source.target} has changed since this run was trained ({where} "
                          f"records sha256 {sha256[:12]}..., the file now has {(source.sha256 or 'none')[:12]}...); "
                          "restore the "
                          "file as it was, or train again.")
    return obj


def source_of(obj: Any) -> ModelSource:
    """The import path of a Python class, factory or model instance, so that a later process can
    rebuild it; refused (before training) when no later process could import it."""
    kind = type(obj) if isinstance(obj, nn.Module) else obj
    qualname, module_name = getattr(kind, "__qualname__", ""), getattr(kind, "__module__", None)
    label = qualname or repr(kind)
    if not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise CnnlabError(f"{label} is defined inside a function, where a later `cnnlab evaluate` cannot import "
                          "it; define it at the top level of a .py file.")
    module = sys.modules.get(module_name) if module_name else None
    file = getattr(module, "__file__", None)
    if module_name in _LOADED_FILES:
        path = _LOADED_FILES[module_name]
        return ModelSource(f"{path}:{qualname}", sha256_file(path))
    if module_name == "__main__" or module_name is None:
        if not file:
            raise CnnlabError(f"{label} is defined in a notebook or an interactive session, where a later "
                              f"`cnnlab evaluate` cannot import it; move it into a file such as net.py and "
                              f"pass model='net.py:{qualname}' (or import it from there).")
        path = Path(file).resolve()
        return ModelSource(f"{path}:{qualname}", sha256_file(path))
    if file and "." not in module_name and not _installed(Path(file)):
        # a module beside the user's script (`from net import Net`): importable by name only from
        # there, so recorded by its file, which any later process can load
        path = Path(file).resolve()
        return ModelSource(f"{path}:{qualname}", sha256_file(path))
    return ModelSource(f"{module_name}:{qualname}", sha256_file(Path(file)) if file else None)


def _installed(file: Path) -> bool:
    """A module installed in this environment (site-packages, the standard library)."""
    import sysconfig

    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib")}
    return any(file.resolve().is_relative_to(Path(root).resolve()) for root in roots)


def build(obj: Callable[..., Any], in_channels: int, num_classes: int, model_args: dict[str, Any],
          label: str) -> nn.Module:
    """Call a model class or factory with `model_args`, adding in_channels and num_classes where
    its signature names them (num_classes also where it takes **kwargs, as torchvision's builders
    do: they pass it on to the model, which has no in_channels)."""
    kwargs = dict(model_args)
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if key not in kwargs and (key in params or takes_any and key == "num_classes"):
            kwargs[key] = value
    try:
        model = obj(**kwargs)
    except Exception as exc:  # the user's constructor: whatever it raises is reported, in one line
        raise CnnlabError(f"Cannot build {label}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
                          f"{type(exc).__name__}: {first_line(exc)}.") from None
    if not isinstance(model, nn.Module):
        raise CnnlabError(f"{label} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise CnnlabError(f"Model file {path} does not exist.")
    # The running script, or a module the user imported from this file (preferred to one this
    # module loaded): importing it again would run its code twice, with classes of another identity.
    loaded = [module for module in list(sys.modules.values()) if _is_file_of(module, path)]
    if loaded:
        return min(loaded, key=lambda module: module.__name__ in _LOADED_FILES)
    name = "cnnlab_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    # the file's own folder first on the path, as when it runs as a script: it may import its neighbours
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CnnlabError(f"{path} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _LOADED_FILES[name] = path
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report what it raised, where
        del sys.modules[name]
        raise CnnlabError(f"Cannot import the model file {path}: {_where(exc)}.") from None
    return module


def _is_file_of(module: Any, path: Path) -> bool:
    file = getattr(module, "__file__", None)
    return isinstance(file, str) and os.path.basename(file) == path.name and Path(file).resolve() == path


def _import_module(target: str) -> Any:
    # the current folder on the path, as `python -m` and uvicorn have it: package.module resolves from here
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise CnnlabError(f"No module named {target!r}: install its package, run from the folder that "
                              "holds it, or add that folder to PYTHONPATH.") from None
        raise CnnlabError(f"Cannot import {target}: {_where(exc)}.") from None
    except Exception as exc:
        raise CnnlabError(f"Cannot import {target}: {_where(exc)}.") from None


def _where(exc: BaseException) -> str:
    """An exception from user code as one line, with the line number where Python gives one."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError at line {exc.lineno}: {exc.msg}"
    return f"{type(exc).__name__}: {first_line(exc)}"
