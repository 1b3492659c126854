"""Files of a run directory: model weights (safetensors + JSON, never pickle) and training state.

Everything is written atomically: a temporary file in the same folder, fsync, rename, so a
crash leaves the previous complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CnnlabError, first_line

MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
MAX_IMAGE_SIDE = 4096  # pixels; larger sides in model.json are damage, not a model
REQUIRED_META = {"format_version": int, "architecture": str, "model_args": dict, "num_classes": int,
                 "class_names": list, "in_channels": int, "image_size": list, "mean": list, "std": list,
                 "weights_sha256": str}


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path`.

    A failure to write (full disk, no permission, a file where a folder should be) is a
    CnnlabError, and leaves whatever was at `path` before untouched."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file owner-only; give it the usual permissions
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CnnlabError(f"Cannot write {path}: {exc.strerror or exc}; "
                          "anything written there before is intact.") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: nn.Module, meta: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write model.safetensors and model.json (with the weights' sha256); return the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = run_dir / MODEL_FILE
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": sha256_file(weights)}
    write_json(run_dir / MODEL_META, meta)
    return meta


def read_model_meta(run_dir: Path) -> dict[str, Any]:
    """Read and check model.json; a missing, malformed or inconsistent file is a CnnlabError."""
    path = Path(run_dir) / MODEL_META
    if not Path(run_dir).is_dir():
        raise CnnlabError(f"Run directory {run_dir} does not exist.")
    if not path.is_file():
        raise CnnlabError(f"{run_dir} holds no {MODEL_META}; is it a finished cnnlab run directory?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CnnlabError(f"{path} is not valid JSON; the run directory is damaged.") from None
    if not isinstance(meta, dict):
        raise CnnlabError(f"{path} must hold a JSON object.")
    version = meta.get("format_version")
    if _is(version, int) and version > FORMAT_VERSION:
        raise CnnlabError(f"{path} was written by a newer cnnlab (format {version}); upgrade cnnlab.")
    problem = _meta_problem(meta)
    if problem:
        raise CnnlabError(f"{path} {problem}; the run directory is damaged or was not written by cnnlab.")
    return meta


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that JSON's true and false are not numbers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with model.json's contents (the end of a sentence), or None."""
    from .config import field_choices
    from .models import check_model_name

    for key, kind in REQUIRED_META.items():
        if not _is(meta.get(key), kind):
            return f"lacks a valid {key!r} ({kind.__name__})"
    names, channels, size = meta["class_names"], meta["in_channels"], meta["image_size"]
    if meta["format_version"] != FORMAT_VERSION:
        return f"has format_version {meta['format_version']}; this cnnlab reads format {FORMAT_VERSION}"
    try:
        check_model_name(meta["architecture"])
    except CnnlabError as exc:
        return f"names an unknown architecture ({str(exc).rstrip('.')})"
    if meta["num_classes"] < 1:
        return f"has num_classes {meta['num_classes']}; a model needs at least one class"
    if len(names) != meta["num_classes"]:
        return f"lists {len(names)} class names for {meta['num_classes']} classes"
    if not all(_is(name, str) for name in names):
        return "has class names that are not strings"
    if channels not in (1, 3):
        return f"has in_channels {channels}; models take 1 (grayscale) or 3 (RGB)"
    if len(size) != 2 or not all(_is(side, int) and 1 <= side <= MAX_IMAGE_SIDE for side in size):
        return f"has image_size {size}; it must be [height, width] in pixels, at most {MAX_IMAGE_SIDE}"
    for key in ("mean", "std"):  # measured on the 0-1 scale; the comparisons also reject NaN
        if len(meta[key]) != channels or not all(_is(v, (int, float)) and 0 <= v <= 1 for v in meta[key]):
            return f"has {key} {meta[key]}; it must hold {channels} number(s) in [0, 1], one per channel"
    if 0 in meta["std"]:
        return f"has std {meta['std']}; a standard deviation of 0 cannot normalise"
    if not re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"]):
        return "has a weights_sha256 that is not 64 hexadecimal digits"
    if meta.get("tta", "none") not in field_choices("tta") or not _is(meta.get("tta_flip", True), bool):
        return f"has an unknown test-time augmentation {meta.get('tta')!r} (tta_flip {meta.get('tta_flip')!r})"
    if not all(_is(meta.get(key, ""), str) for key in ("dataset", "recipe", "cnnlab_version")):
        return "has a dataset, recipe or cnnlab_version that is not a string"
    return None


def load_weights(run_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict from model.safetensors, after checking its sha256 against model.json."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise CnnlabError(f"{run_dir} holds no {MODEL_FILE}.")
    if sha256_file(path) != meta["weights_sha256"]:
        raise CnnlabError(f"{path} does not match the sha256 in {MODEL_META}; the weights were changed or damaged.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CnnlabError(f"{path} is not a valid safetensors file ({first_line(exc)}).") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch's file writer reports a full disk this way
            raise OSError(str(exc).splitlines()[0]) from None
    atomic_write(path, write)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load training state without unpickling arbitrary objects (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CnnlabError(f"{path} is not a valid cnnlab checkpoint ({type(exc).__name__}).") from None
