"""Files of a run directory: model weights (safetensors + JSON, never pickle) and training state.

Everything is written atomically: a temporary file in the same folder, fsync, rename, so a
crash leaves the previous complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CnnlabError

MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_META = {"format_version": int, "architecture": str, "model_args": dict, "num_classes": int,
                 "class_names": list, "in_channels": int, "image_size": list, "mean": list, "std": list,
                 "weights_sha256": str}


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file owner-only; give it the usual permissions
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    """Read and check model.json; a missing, malformed or incomplete file is a CnnlabError."""
    path = Path(run_dir) / MODEL_META
    if not Path(run_dir).is_dir():
        raise CnnlabError(f"Run directory {run_dir} does not exist.")
    if not path.is_file():
        raise CnnlabError(f"{run_dir} holds no {MODEL_META}; is it a finished cnnlab run directory?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CnnlabError(f"{path} is not valid JSON; the run directory is damaged.") from None
    if not isinstance(meta, dict):
        raise CnnlabError(f"{path} must hold a JSON object.")
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise CnnlabError(f"{path} lacks a valid {key!r} ({kind.__name__}); the run directory is damaged.")
    if meta["format_version"] > FORMAT_VERSION:
        raise CnnlabError(f"{path} was written by a newer cnnlab (format {meta['format_version']}); upgrade cnnlab.")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise CnnlabError(f"{path} lists {len(meta['class_names'])} class names for {meta['num_classes']} classes.")
    return meta


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
        raise CnnlabError(f"{path} is not a valid safetensors file ({exc}).") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load training state without unpickling arbitrary objects (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CnnlabError(f"{path} is not a valid cnnlab checkpoint ({type(exc).__name__}).") from None
