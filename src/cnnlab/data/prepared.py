"""Prepared datasets: raw uint8 image files on disk, read a batch of rows at a time.

A prepared directory holds `meta.json` and, per split, `<split>.images.u8` (N, C, H, W) plus
`<split>.labels.i64`; `DiskImages` reads the rows it is asked for, so memory stays flat, and
`conversion_lock` has one process at a time write a directory while the others wait for it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sys
import threading
import time
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import CnnlabError

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename still keeps readers from torn caches
    fcntl = None

FORMAT = 1  # of the prepared directory; another number is a cache to rebuild
META_FILE = "meta.json"
SLICE_BYTES = 16 << 20  # rows per step when a whole split is copied (to a device, a dtype, a resize)
_PREADV = hasattr(os, "preadv")  # Linux, macOS, BSDs
POLL_SECONDS = 0.5  # how often a process waiting for another's conversion looks again
STALL_SECONDS = 600  # a conversion elsewhere that shows no progress for this long is given up on


def images_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.images.u8"


def labels_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.labels.i64"


class _RowFile:
    """An open images file, shared by every view of it, read with positioned reads.

    Not a memory map: file pages a process has mapped count in its resident set, and Linux maps
    a whole page-cache folio (2 MiB on ext4 with large folios) on the first touch of any byte in
    it, so one shuffled batch of 256 rows can map 512 MiB (MADV_NOHUGEPAGE and MADV_RANDOM do not
    change that; MADV_DONTNEED only drops the pages afterwards). A positioned read copies just the
    rows from the page cache, which keeps the data for the next epoch either way; it costs about
    4 us per row, well under 1% of a training step.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb", buffering=0)
        self.lock = threading.Lock()  # only where positioned reads are missing (Windows)

    def read_into(self, buffer: memoryview, offset: int) -> None:
        while len(buffer):
            if _PREADV:
                n = os.preadv(self.file.fileno(), [buffer], offset)
            else:
                with self.lock:
                    self.file.seek(offset)
                    n = self.file.readinto(buffer)
            if not n:
                raise CnnlabError(f"{self.path} is shorter than when it was opened; it changed while in use, "
                                  "so prepare the dataset again.")
            buffer, offset = buffer[n:], offset + n


class DiskImages:
    """uint8 (N, C, H, W) images in a file, read on demand: `Split.images` of a prepared dataset.

    Indexing with an int, a slice, or an index/mask tensor reads those rows into an ordinary
    uint8 tensor; `subset` selects rows without reading them. Torch functions (torch.cat,
    torch.equal, ...) and any other tensor method act on an in-memory copy of all rows, as
    they would on a tensor split: fine for small splits, a full read of large ones.
    """

    dtype = torch.uint8
    device = torch.device("cpu")
    ndim = 4
    is_cuda = False
    requires_grad = False

    def __init__(self, path: str | Path, shape: tuple[int, ...], rows: np.ndarray | None = None,
                 *, file: _RowFile | None = None):
        self.path = Path(path)
        self.file_shape = tuple(int(s) for s in shape)
        self.rows = rows  # int64 row numbers in the file, or None for all of them in order
        self._file = file or _RowFile(self.path)
        self.shape = torch.Size((len(rows) if rows is not None else self.file_shape[0], *self.file_shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskImages({str(self.path)!r}, shape={tuple(self.shape)})"

    def __reduce__(self) -> tuple[Any, ...]:  # another process opens the file afresh
        return DiskImages, (self.path, self.file_shape, self.rows)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.file_shape[1:])

    # ---------------------------------------------------------------- reading rows

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):
            return self._multi(key)
        if _is_int(key):
            return self._read(np.array([self._position(key)]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(*key.indices(len(self))))
        index = self._positions(key)
        return self._read(index.reshape(-1)).reshape(*index.shape, *self.shape[1:])

    def _multi(self, key: tuple) -> torch.Tensor:
        """x[rows, ...]: read the rows the first index names, then index them as torch would."""
        if not key or key[0] is Ellipsis or key[0] is None:
            return self.tensor()[key]
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            return self[first][(slice(None), *rest)]
        if _is_int(first):
            return self._read(np.array([self._position(first)]))[(0, *rest)]
        positions = self._positions(first)
        unique, inverse = np.unique(positions, return_inverse=True)
        return self._read(unique)[(torch.from_numpy(inverse.reshape(positions.shape)), *rest)]

    def _position(self, key: Any) -> int:
        i = int(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of bounds for {len(self)} images")
        return i % len(self)

    def _positions(self, key: Any) -> np.ndarray:
        """An index tensor, array or list (of ints or bools) as int64 positions in this view."""
        index = key if isinstance(key, torch.Tensor) else torch.as_tensor(np.asarray(key))
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise IndexError(f"a mask of shape {tuple(index.shape)} does not fit {len(self)} images")
            index = index.nonzero().flatten()
        if index.is_floating_point() or index.is_complex():
            raise IndexError("tensors used as indices must be integer or bool")
        index = index.cpu().numpy().astype(np.int64, copy=False)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} images")
        return np.where(index < 0, index + len(self), index)

    def _read(self, positions: np.ndarray) -> torch.Tensor:
        """The rows at `positions` of this view, one read per run of consecutive file rows."""
        rows = self.rows[positions] if self.rows is not None else positions
        out = np.empty((len(rows), *self.file_shape[1:]), np.uint8)
        buffer, size = memoryview(out.reshape(-1)), self.row_bytes
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1).tolist() + [len(rows)]
        for begin, end in zip(starts, starts[1:]):
            self._file.read_into(buffer[begin * size:end * size], int(rows[begin]) * size)
        return torch.from_numpy(out)

    def subset(self, index: Any) -> "DiskImages":
        """The rows at `index` (tensor, array or list), still on disk: nothing is read."""
        positions = self._positions(index).reshape(-1)
        rows = self.rows[positions] if self.rows is not None else positions
        return DiskImages(self.path, self.file_shape, rows, file=self._file)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    # ---------------------------------------------------------------- whole-split copies

    def slices(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, rows) of consecutive slices of about SLICE_BYTES, in order."""
        step = max(1, SLICE_BYTES // self.row_bytes)
        for start in range(0, len(self), step):
            yield start, self[start:start + step]

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """All rows as one tensor (on a device, of a dtype), copied a slice at a time."""
        like = torch.empty(0, dtype=self.dtype).to(*args, **kwargs)
        out = torch.empty(self.shape, dtype=like.dtype, device=like.device)
        for start, rows in self.slices():
            out[start:start + len(rows)] = rows
        return out

    def tensor(self) -> torch.Tensor:
        """All rows in memory."""
        return self.to("cpu")

    def numpy(self) -> np.ndarray:
        return self.tensor().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.numpy() if dtype is None else self.numpy().astype(dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*_in_memory(args), **{k: _in_memory(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not hasattr(torch.Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.tensor(), name)


def _is_int(key: Any) -> bool:
    if isinstance(key, torch.Tensor):
        return key.ndim == 0 and not key.is_floating_point() and key.dtype != torch.bool
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def _in_memory(value: Any) -> Any:
    if isinstance(value, DiskImages):
        return value.tensor()
    if isinstance(value, (list, tuple)):
        return type(value)(_in_memory(v) for v in value)
    return value


# ---------------------------------------------------------------- writing

# No mean/std kept: channel_stats takes ~1.5 s per 586 MiB (2 threads); exact sums would differ from it by 3e-15.
class SplitWriter:
    """Appends uint8 rows to a split's images file, preallocated for `capacity` rows, and collects its labels."""

    def __init__(self, directory: Path, split: str, capacity: int, row_shape: tuple[int, int, int]):
        self.directory, self.split, self.row_shape = directory, split, row_shape
        self.row_bytes = math.prod(row_shape)
        self.file = open(images_file(directory, split), "wb")
        self.count = 0
        self.labels = array("q")
        try:  # a full disk is found now, not hours into the conversion
            os.posix_fallocate(self.file.fileno(), 0, max(1, capacity * self.row_bytes))
        except AttributeError:  # not on this platform
            pass
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.file.close()
                raise CnnlabError(f"Not enough disk space in {directory.parent} for the prepared dataset "
                                  f"({_gib(capacity * self.row_bytes)} needed); free some, or set CNNLAB_CACHE "
                                  "to a folder on a disk with room.") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def append(self, rows: np.ndarray, labels: list[int]) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype=np.uint8).data)
        self.count += len(rows)
        self.labels.extend(labels)

    def close(self) -> dict[str, Any]:
        """Trim the preallocated file to the rows written; the split's entry in meta.json."""
        self.file.truncate(self.count * self.row_bytes)
        self.file.close()
        np.frombuffer(self.labels, dtype=np.int64).astype("<i8").tofile(labels_file(self.directory, self.split))
        return {"count": self.count}

    def abandon(self) -> None:
        self.file.close()

    def remove(self) -> None:
        """Delete the split's files (a split none of whose files could be read)."""
        images_file(self.directory, self.split).unlink(missing_ok=True)
        labels_file(self.directory, self.split).unlink(missing_ok=True)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=1), encoding="utf-8")


# ---------------------------------------------------------------- reading a directory

class DamagedCache(Exception):
    """A prepared directory that is incomplete, truncated or of another format."""


def open_prepared(directory: Path) -> tuple[dict[str, Any], dict[str, tuple[DiskImages, torch.Tensor]]]:
    """meta.json and, per split, its images on disk and labels; DamagedCache if anything is off.

    The checks are the cheap ones (format, sizes, label range): a prepared dataset is never
    read in full just to be opened.
    """
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or not meta["splits"]:
            raise DamagedCache(f"{directory} is of another format")
        side = meta["image_size"]  # one side for square images, else [height, width]
        height, width = (int(side), int(side)) if isinstance(side, int) else (int(side[0]), int(side[1]))
        shape = (int(meta["channels"]), height, width)
        splits = {}
        for split, info in meta["splits"].items():
            n = int(info["count"])
            images, labels = images_file(directory, split), labels_file(directory, split)
            if n < 1 or images.stat().st_size != n * math.prod(shape) or labels.stat().st_size != 8 * n:
                raise DamagedCache(f"{images} or {labels} does not hold {n} images")
            label_values = torch.from_numpy(np.fromfile(labels, dtype="<i8").astype(np.int64))
            if int(label_values.min()) < 0 or int(label_values.max()) >= len(meta["classes"]):
                raise DamagedCache(f"{labels} holds labels outside the {len(meta['classes'])} classes")
            splits[split] = (DiskImages(images, (n, *shape)), label_values)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCache(f"{directory}: {type(exc).__name__}: {exc}") from None
    return meta, splits


# ---------------------------------------------------------------- one converter at a time

@contextmanager
def conversion_lock(path: Path, what: str) -> Iterator[Callable[[], None]]:
    """Hold the lock on converting one cache entry, waiting while another process holds it;
    yields a heartbeat to call as the conversion progresses, which the waiters watch. `what`
    names the source being prepared, for the messages.

    An flock: the kernel releases it when its holder dies, so a crash never leaves it stuck.
    """
    try:
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise CnnlabError(f"Cannot write the dataset cache in {path.parent}: {exc.strerror or exc}; "
                          "set CNNLAB_CACHE to a writable folder.") from None
    with fh:
        announced = False
        while fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError:  # a file system without locks: convert, the rename keeps it safe
                break
            holder = path.read_text(encoding="utf-8").strip() or "another process"
            idle = time.time() - path.stat().st_mtime
            if idle > STALL_SECONDS:
                raise CnnlabError(f"{holder} has been preparing {what} but has shown no progress for "
                                  f"{idle / 60:.0f} minutes; stop it (or delete {path} if it is gone) and run again.")
            if not announced:
                print(f"waiting for {holder}, which is preparing {what}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(POLL_SECONDS)
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield lambda: os.utime(path)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
