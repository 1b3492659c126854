"""Filesystem helpers: atomic writes with the usual permissions, sha256 of a file, and the cache folder.

A write goes to a temporary file in the same folder, is fsynced and renamed over the target, so a
crash leaves the previous complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import CnnlabError

_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """Where cnnlab keeps downloads and prepared datasets (override with $CNNLAB_CACHE)."""
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path`.

    A failure to write (full disk, no permission, a file where a folder should be) is a
    CnnlabError, and leaves whatever was at `path` before untouched."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        # mkstemp makes the file owner-only, and some writers (safetensors) create it anew:
        # set the usual permissions on what was written, whoever wrote it
        os.chmod(tmp, 0o666 & ~_UMASK)
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


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
