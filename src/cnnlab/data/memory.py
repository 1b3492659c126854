"""Datasets from Python: the user's arrays, tensors or torch `Dataset` converted once into a `DatasetBundle`.

Images become uint8 (N, C, H, W) on the scale image files are read at, so a model trained on them
predicts on files correctly; a dataset too large for `max_memory_bytes` is streamed into a
prepared directory on disk (prepared.py) and read from there a batch at a time.
"""

from __future__ import annotations

import atexit
import math
import operator
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset
from tqdm import tqdm

from ..errors import CnnlabError, InvalidSetting
from ..files import cache_dir as default_cache_dir
from ..images.arrays import as_uint8, drop_alpha
from ..images.tensors import from_pil
from .prepared import DamagedCache, DiskImages, SplitWriter, images_file, open_prepared, write_meta
from .split import DatasetBundle, Split, stratified_holdout

CHANNELS = (1, 3, 4)  # grayscale, RGB, RGBA (alpha composited over white, as image files are)
STEP_BYTES = 16 << 20  # input converted at once: bounds the temporaries of a float conversion
# Floats this close outside [0, 1] (resampling overshoot) round to 0 or 255 all the same.
FLOAT_SLACK = 0.5 / 255
FLOAT_NOTE = "float images 0-1 scaled to uint8 0-255"  # appended to the bundle's name
FLUSH_BYTES = 4 << 20  # converted rows a streamed split writes to disk at once

ImagesAndLabels = tuple[Any, Any]  # (images, labels) as bundle_from_arrays takes them


# ---------------------------------------------------------------- images

def _as_numpy(x: Any) -> tuple[np.ndarray, bool]:
    """The array and whether it came as a torch tensor (which decides an ambiguous layout)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):  # no numpy dtype
            x = x.float()
        return x.numpy(), True
    return np.asarray(x), False


def _nhwc(x: np.ndarray, from_torch: bool, what: str, batch: bool) -> np.ndarray:
    """A (N, H, W, C) view of a batch given as (N, H, W), (N, H, W, C) or (N, C, H, W).

    The channel axis is the one whose size is a channel count (1, 3 or 4); when both dim 1 and the
    last dim are, the container's own convention decides: (N, C, H, W) for a torch tensor,
    (N, H, W, C) for anything else (numpy, PIL). `batch`: False for one image given as x[None]."""
    if x.ndim == 3:
        return x[..., None]
    shape, forms = (tuple(x.shape), "(N, H, W), (N, H, W, C) or (N, C, H, W)") if batch else \
        (tuple(x.shape[1:]), "(H, W), (H, W, C) or (C, H, W)")
    if x.ndim != 4:
        raise CnnlabError(f"Shape {shape} of the {what} is not an image shape; pass {forms} with C = 1, 3 or 4.")
    last, first = x.shape[3] in CHANNELS, x.shape[1] in CHANNELS
    if last and first:
        last = not from_torch
    if not (last or first):
        raise CnnlabError(f"Shape {shape} of the {what} has no channel axis of 1, 3 or 4 first or last; "
                          f"pass {forms}.")
    return x if last else x.transpose(0, 2, 3, 1)


def _steps(n: int, row_bytes: int) -> Iterator[slice]:
    step = max(1, STEP_BYTES // max(1, row_bytes))
    for start in range(0, n, step):
        yield slice(start, start + step)


def _check_values(x: np.ndarray, what: str) -> bool:
    """Refuse values that are not images on the 0-255 or 0-1 scale; True for floats (scaled by 255)."""
    if x.dtype == np.uint8:
        return False
    floating = np.issubdtype(x.dtype, np.floating)
    if x.dtype == np.bool_ or not (floating or np.issubdtype(x.dtype, np.integer)):
        raise CnnlabError(f"The {what} cannot be of dtype {x.dtype}; pass uint8 values 0-255 or floats in [0, 1].")
    if x.size == 0:
        return floating
    row_bytes = math.prod(x.shape[1:]) * x.itemsize
    ranges = [(x[s].min(), x[s].max()) for s in _steps(len(x), row_bytes)]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)  # NaN propagates through min and max
    if not floating:
        if lo < 0 or hi > 255:
            raise CnnlabError(f"Integer values from {lo} to {hi} in the {what} are not 0-255; pass values "
                              "0-255, shifting 16-bit images down to 8 bits first (x >> 8).")
        return False
    if np.isnan(lo) or np.isnan(hi):
        raise CnnlabError(f"There are NaN values in the {what}; replace them (np.nan_to_num) or leave "
                          "those images out.")
    if lo >= -FLOAT_SLACK and hi <= 1 + FLOAT_SLACK:
        return True
    if lo >= 0 and hi <= 255:
        raise CnnlabError(f"Float values from {lo:.4g} to {hi:.4g} in the {what} are on the 0-255 scale; "
                          "pass such images as uint8 (x.astype(np.uint8) or x.to(torch.uint8)) or divided by 255.")
    raise CnnlabError(f"Float values from {lo:.4g} to {hi:.4g} in the {what} lie outside [0, 1], as if already "
                      "normalised; pass images before any Normalize transform (cnnlab normalises them itself), "
                      "as floats in [0, 1] or uint8 0-255.")


def _to_uint8(nhwc: np.ndarray, what: str) -> tuple[torch.Tensor, bool]:
    """uint8 (N, C, H, W) with C in {1, 3}, and whether the values were floats scaled from [0, 1].

    The same rules as for image files: floats by as_uint8 (x * 255, rounded), alpha composited
    over white. uint8 images already in (N, C, H, W) are shared, not copied."""
    if len(nhwc) == 0:
        raise CnnlabError(f"There are no {what}; pass at least one image.")
    scaled = _check_values(nhwc, what)
    n, h, w, c = nhwc.shape
    nchw = nhwc.transpose(0, 3, 1, 2)
    if nchw.dtype == np.uint8 and c != 4 and nchw.flags.c_contiguous:
        return torch.from_numpy(nchw if nchw.flags.writeable else nchw.copy()), False
    out = torch.empty((n, 3 if c == 4 else c, h, w), dtype=torch.uint8)
    rows = out.numpy()
    for s in _steps(n, h * w * c * nhwc.itemsize):
        rows[s] = drop_alpha(as_uint8(nhwc[s])).transpose(0, 3, 1, 2)
    return out, scaled


# ---------------------------------------------------------------- labels and class names

def _labels(labels: Any, n: int, what: str) -> torch.Tensor:
    """int64 (N,) class indices, refused unless one non-negative integer per image."""
    y, _ = _as_numpy(labels)
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:
        raise CnnlabError(f"The {what} labels have shape {tuple(y.shape)}; pass one class index per image, "
                          "such as labels.argmax(1) for one-hot labels.")
    if y.ndim != 1:
        raise CnnlabError(f"The {what} labels have shape {tuple(y.shape)}; pass one class index per image, "
                          f"shape ({n},).")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise CnnlabError(f"The {what} labels are of dtype {y.dtype}; pass integer class indices 0, 1, 2, ...")
    if len(y) != n:
        raise CnnlabError(f"There are {n:,} {what} images but {len(y):,} labels; pass one label per image.")
    if len(y) and y.min() < 0:
        raise CnnlabError(f"The {what} labels include {y.min()}; pass class indices from 0 up.")
    return torch.from_numpy(y.astype(np.int64))


def _class_names(given: Sequence[Any] | None, splits: dict[str, Split]) -> list[str]:
    """The given names (checked against every label), or "0", "1", ... up to the largest label."""
    top = max(int(split.labels.max()) for split in splits.values())
    if given is None:
        return [str(i) for i in range(top + 1)]
    names = [str(name) for name in given]
    if not names:
        raise CnnlabError("class_names is empty; pass one name per class, or leave it out for 0, 1, 2, ...")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CnnlabError(f"class_names holds {repeated[0]!r} more than once; give every class its own name.")
    for split_name, split in splits.items():
        if int(split.labels.max()) >= len(names):
            raise CnnlabError(f"The {split_name} labels go up to {int(split.labels.max())}, but there are "
                              f"{len(names)} class names (labels 0-{len(names) - 1}); pass a name for every class.")
    return names


# ---------------------------------------------------------------- the bundle

def _arrays_split(images: Any, labels: Any, split: str) -> tuple[Split, bool]:
    """One split from arrays, and whether its images were floats scaled from [0, 1]."""
    what = f"{split} images"
    nhwc = _nhwc(*_as_numpy(images), what, batch=True)
    # labels before values: they are cheap to check, the images may take seconds to convert
    y = _labels(labels, len(nhwc), split)
    x, scaled = _to_uint8(nhwc, what)
    return Split(x, y), scaled


def _check_fractions(test: Any, val: Any, val_split: float, test_split: float) -> None:
    if test is None and not 0 < test_split < 1:
        raise InvalidSetting("test_split", f"must be between 0 and 1 when no test split is given, got {test_split}.")
    if val is None and not 0 <= val_split < 1:
        raise InvalidSetting("val_split", f"must be at least 0 and below 1, got {val_split}.")


def _bundle(name: str, class_names: Sequence[Any] | None, splits: dict[str, Split], val_split: float,
            test_split: float, seed: int) -> DatasetBundle:
    """The bundle, with the test and validation hold-outs drawn from train where not given."""
    names = _class_names(class_names, splits)
    train, test, val = splits["train"], splits.get("test"), splits.get("val")
    if test is None:
        keep, held = stratified_holdout(train.labels, test_split, seed)
        if len(held) == 0:
            raise CnnlabError(f"The test hold-out ({test_split:.0%} of {len(train)} training images) is empty; "
                              "give each class at least 2 images, or pass test=(images, labels).")
        train, test = train.subset(keep), train.subset(held)
    if val is None and val_split > 0:
        keep, held = stratified_holdout(train.labels, val_split, seed)
        if len(held):
            train, val = train.subset(keep), train.subset(held)
    return DatasetBundle(name, names, train, test, val, allow_flip=True)


def _check_alike(splits: dict[str, Split]) -> None:
    """Every split's images of the train images' channels and size."""
    shape = tuple(splits["train"].images.shape[1:])
    for split_name, split in splits.items():
        if tuple(split.images.shape[1:]) != shape:
            raise CnnlabError(f"The {split_name} images are {_size(split.images.shape[1:])} but the train images are "
                              f"{_size(shape)} (CxHxW); pass images of one size and channel count for every split.")


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _named(name: str, scaled: bool) -> str:
    # The bundle has no field for notes; the name travels to the log and the model card, where
    # whoever predicts on float arrays later sees what training saw.
    return f"{name} ({FLOAT_NOTE})" if scaled else name


def bundle_from_arrays(images: Any, labels: Any, class_names: Sequence[Any] | None = None, *,
                       test: ImagesAndLabels | None = None, val: ImagesAndLabels | None = None,
                       val_split: float = 0.0, test_split: float = 0.1, seed: int = 0,
                       name: str = "arrays") -> DatasetBundle:
    """A dataset from images and labels in memory (numpy arrays, torch tensors or lists).

    images: (N, H, W) grayscale, (N, H, W, C) with C = 1, 3 or 4, or (N, C, H, W) with C = 1, 3
    or 4; when both dim 1 and the last dim could be the channels, as in (N, 3, 32, 3), a torch
    tensor is read as (N, C, H, W) and anything else as (N, H, W, C). Values are uint8 (or any
    integer type) 0-255, or floats in [0, 1], scaled to uint8 as image files are read (the
    bundle's name then says so); RGBA is composited over white. labels: class indices 0..K-1.
    class_names: default "0", "1", ... up to the largest label.

    test, val: (images, labels) of those splits. Without test, a seeded stratified `test_split`
    of the training images is held out as the test split; without val, `val_split` of what
    remains becomes the validation split (none when 0).
    """
    _check_fractions(test, val, val_split, test_split)
    given = {"train": (images, labels), "test": test, "val": val}
    splits, scaled = {}, False
    for split_name, pair in given.items():
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise CnnlabError(f"{split_name} is of type {type(pair).__name__}; pass it as a pair (images, labels).")
        splits[split_name], was_float = _arrays_split(*pair, split_name)
        scaled = scaled or was_float
    _check_alike(splits)
    return _bundle(_named(name, scaled), class_names, splits, val_split, test_split, seed)


# ---------------------------------------------------------------- torch datasets

class _Memory:
    """The bytes of converted images still allowed in memory, over all splits."""

    def __init__(self, limit: int):
        self.left = limit


class _Disk:
    """The prepared directory streamed splits go to, created on first use.

    One under the cache folder is this process's alone and removed when it exits: it cannot be
    found again (a Python dataset has no cheap fingerprint), so keeping it would only fill the disk.
    A directory the caller names is theirs to keep."""

    def __init__(self, given: str | Path | None, name: str):
        self.given, self.name = given, name
        self.directory: Path | None = None
        self.created = False
        self.splits: dict[str, dict[str, Any]] = {}

    def path(self) -> Path:
        if self.directory is not None:
            return self.directory
        try:
            if self.given is not None:
                self.directory = Path(self.given).expanduser()
                self.directory.mkdir(parents=True, exist_ok=True)
            else:
                parent = default_cache_dir() / "datasets"
                parent.mkdir(parents=True, exist_ok=True)
                safe = re.sub(r"[^\w.-]+", "-", self.name).strip("-") or "dataset"
                self.directory = Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=parent))
                self.created = True
                atexit.register(_remove_if_mine, self.directory, os.getpid())
        except OSError as exc:
            where = self.given if self.given is not None else default_cache_dir()
            raise CnnlabError(f"Cannot create a folder for the converted dataset in {where}: "
                              f"{exc.strerror or exc}; pass cache_dir= a writable folder.") from None
        return self.directory

    def abandon(self) -> None:
        if self.created and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _remove_if_mine(directory: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that exits normally while this process goes on
        shutil.rmtree(directory, ignore_errors=True)


class _Rows:
    """One split's converted rows: in memory while they fit in the budget, else streamed to disk.

    Rows gather in a preallocated buffer (the whole split when its size is known and fits), so a
    split in memory is held once, not once as rows and again when they are joined."""

    def __init__(self, split: str, expected: int | None, shape: tuple[int, ...], memory: _Memory, disk: _Disk):
        self.split, self.shape, self.memory, self.disk = split, shape, memory, disk
        self.row_bytes = math.prod(shape)
        fits = expected is not None and expected * self.row_bytes <= memory.left
        self.step = max(1, expected) if fits else max(1, FLUSH_BYTES // self.row_bytes)  # rows per buffer
        self.labels: list[int] = []
        self.full: list[torch.Tensor] = []  # filled buffers kept in memory
        self.buffer: torch.Tensor | None = None  # allocated when a row arrives for it
        self.filled = 0
        self.writer: SplitWriter | None = None
        self.written = 0  # rows on disk
        if expected is not None and not fits:
            self._to_disk(expected)

    def add(self, row: torch.Tensor, label: int) -> None:
        if self.buffer is None:
            self.buffer = torch.empty((self.step, *self.shape), dtype=torch.uint8)
        self.buffer[self.filled] = row
        self.filled += 1
        self.labels.append(label)
        if self.filled == len(self.buffer):
            self._buffer_full()

    def _buffer_full(self) -> None:
        rows = self.buffer[:self.filled]
        self.buffer, self.filled = None, 0
        if self.writer is not None:
            self._write(rows)
            return
        self.full.append(rows)
        if self._held() > self.memory.left:
            self._to_disk(self._held() // self.row_bytes)

    def _held(self) -> int:
        return (sum(len(rows) for rows in self.full) + self.filled) * self.row_bytes

    def _to_disk(self, capacity: int) -> None:
        directory = self.disk.path()
        with _writing(directory):
            self.writer = SplitWriter(directory, self.split, capacity, self.shape)
        for rows in self.full:
            self._write(rows)
        self.full = []

    def _write(self, rows: torch.Tensor) -> None:
        with _writing(self.disk.path()):
            self.writer.append(rows.numpy(), self.labels[self.written:self.written + len(rows)])
        self.written += len(rows)

    def finish(self) -> Split:
        labels = torch.tensor(self.labels, dtype=torch.int64)
        if self.writer is None and self._held() > self.memory.left:
            self._to_disk(len(self.labels))
        if self.writer is None:
            self.memory.left -= self._held()
            rows = [*self.full, self.buffer[:self.filled]] if self.filled else self.full
            return Split(rows[0] if len(rows) == 1 else torch.cat(rows), labels)
        if self.filled:
            self._write(self.buffer[:self.filled])
        with _writing(self.disk.path()):
            self.disk.splits[self.split] = self.writer.close()
        return Split(DiskImages(images_file(self.disk.path(), self.split), (len(labels), *self.shape)), labels)

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.abandon()
            self.writer.remove()


@contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """A failed write to the prepared directory as one clear error (SplitWriter reports a full disk itself)."""
    try:
        yield
    except OSError as exc:
        raise CnnlabError(f"Cannot write the converted dataset to {directory}: {exc.strerror or exc}; pass "
                          "cache_dir= a writable folder with room, or a larger max_memory_bytes.") from None


def _items(dataset: Any) -> tuple[Iterable[Any], int | None]:
    """The dataset's items in order and their number, where it has one."""
    try:
        n = len(dataset)
    except TypeError:  # an iterable dataset without a length
        n = None
    if n is not None and hasattr(dataset, "__getitem__") and not isinstance(dataset, IterableDataset):
        return (dataset[i] for i in range(n)), n
    if not hasattr(dataset, "__iter__"):
        raise CnnlabError(f"An object of type {type(dataset).__name__} is not a dataset; pass a torch Dataset (or any sequence or "
                          "iterable) of (image, label) pairs.")
    return dataset, n


def _image(image: Any, item: str) -> tuple[torch.Tensor, bool]:
    """One item's image as uint8 (C, H, W), and whether it was floats scaled from [0, 1]."""
    if isinstance(image, Image.Image):
        return from_pil(image), False
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise CnnlabError(f"{item} holds an image of type {type(image).__name__}; the dataset must yield PIL "
                          "images, (C, H, W) tensors or (H, W[, C]) arrays.")
    if image.ndim == 4:
        raise CnnlabError(f"{item} holds a batch of shape {tuple(image.shape)}; pass the Dataset itself, "
                          "which yields one image per item, not a DataLoader.")
    if image.ndim not in (2, 3):
        raise CnnlabError(f"{item} holds an image of shape {tuple(image.shape)}; the dataset must yield "
                          "(C, H, W) tensors or (H, W[, C]) arrays.")
    what = f"image of {item.lower()}"
    x, from_torch = _as_numpy(image[None])
    rows, scaled = _to_uint8(_nhwc(x, from_torch, what, batch=False), what)
    return rows[0], scaled


def _label(label: Any, names: int | None, item: str) -> int:
    try:
        value = operator.index(label)
    except TypeError:
        raise CnnlabError(f"{item} has label {label!r}; the dataset must yield integer class "
                          "indices 0, 1, 2, ...") from None
    if value < 0 or (names is not None and value >= names):
        limit = f" and below {names}, the number of class names" if names is not None else ""
        raise CnnlabError(f"{item} has label {value}; class indices must be 0 or more{limit}.")
    return value


def _convert_dataset(dataset: Any, split: str, names: int | None, like: tuple[int, ...] | None,
                     memory: _Memory, disk: _Disk, progress: bool) -> tuple[Split, bool]:
    """Every (image, label) of `dataset`, converted once; `like` is the train images' shape, if known."""
    items, n = _items(dataset)
    rows: _Rows | None = None
    scaled = False
    bar = tqdm(total=n, desc=f"converting the {split} dataset", unit="img", file=sys.stderr,
               disable=not progress, leave=False)
    try:
        for i, pair in enumerate(items):
            item = f"Item {i} of the {split} dataset"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CnnlabError(f"{item} is of type {type(pair).__name__}; the dataset must yield (image, label) "
                                  "pairs.")
            image, was_float = _image(pair[0], item)
            scaled = scaled or was_float
            shape = tuple(image.shape)
            if rows is None:
                if like is not None and shape != like:
                    raise CnnlabError(f"Image {i} of the {split} dataset is {_size(shape)} but the train images "
                                      f"are {_size(like)} (CxHxW); {_fix(shape, like)}")
                rows = _Rows(split, n, shape, memory, disk)
            elif shape != rows.shape:
                raise CnnlabError(f"Image {i} of the {split} dataset is {_size(shape)} but image 0 is "
                                  f"{_size(rows.shape)} (CxHxW); {_fix(shape, rows.shape)}")
            rows.add(image, _label(pair[1], names, item))
            bar.update()
        if rows is None:
            raise CnnlabError(f"The {split} dataset yields no items; pass one with at least one (image, label).")
        return rows.finish(), scaled
    except BaseException:
        if rows is not None:
            rows.abandon()
        raise
    finally:
        bar.close()


def _fix(shape: tuple[int, ...], like: tuple[int, ...]) -> str:
    """What makes the images of a dataset alike, for the end of an error."""
    fixes = []
    if shape[1:] != like[1:]:
        fixes.append(f"torchvision.transforms.Resize(({like[1]}, {like[2]})) for the size")
    if shape[0] != like[0]:
        fixes.append("Grayscale() or PIL's .convert('RGB') for the channels")
    return f"give the dataset a transform that makes all images alike: {' and '.join(fixes)}."


def _is_arrays(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and isinstance(value[0], (np.ndarray, torch.Tensor)))


def bundle_from_dataset(dataset: Any, class_names: Sequence[Any] | None = None, *, test: Any = None,
                        val: Any = None, val_split: float = 0.0, test_split: float = 0.1, seed: int = 0,
                        name: str | None = None, max_memory_bytes: int = 1 << 30,
                        cache_dir: str | Path | None = None, progress: bool = True) -> DatasetBundle:
    """A dataset from a torch `Dataset` (map-style or iterable) of (image, label) pairs, converted once.

    image: a PIL image, a (C, H, W) tensor (uint8, or floats in [0, 1] as ToTensor makes them) or
    an (H, W) / (H, W, C) array, every one of the same size and channel count; the value and
    layout rules are bundle_from_arrays'. class_names: default `dataset.classes` where it has
    them (torchvision's datasets do), else "0", "1", ... up to the largest label.

    test, val: Datasets, or (images, labels) arrays, for those splits; without them the hold-outs
    are drawn as bundle_from_arrays draws them. Converted images that would take more than
    `max_memory_bytes` (over all splits) are streamed into a prepared directory instead, read
    from disk a batch at a time: `cache_dir` where given (kept), else a new folder under the
    cache folder's datasets/ that is removed when this process exits.
    """
    _check_fractions(test, val, val_split, test_split)
    name = name or f"dataset:{type(dataset).__name__}"
    if class_names is None and getattr(dataset, "classes", None) is not None:
        class_names = list(dataset.classes)
    names = len(class_names) if class_names is not None else None
    memory, disk = _Memory(max_memory_bytes), _Disk(cache_dir, name)
    splits: dict[str, Split] = {}
    scaled = False
    try:
        for split_name, source in {"train": dataset, "test": test, "val": val}.items():
            if source is None:
                continue
            if _is_arrays(source):
                splits[split_name], was_float = _arrays_split(*source, split_name)
            else:
                like = tuple(splits["train"].images.shape[1:]) if "train" in splits else None
                splits[split_name], was_float = _convert_dataset(source, split_name, names, like, memory, disk,
                                                                  progress)
            scaled = scaled or was_float
        _check_alike(splits)
        bundle = _bundle(_named(name, scaled), class_names, splits, val_split, test_split, seed)
    except BaseException:
        disk.abandon()
        raise
    if disk.splits:
        c, h, w = bundle.train.images.shape[1:]
        with _writing(disk.path()):
            write_meta(disk.path(), {"classes": bundle.class_names, "source": bundle.name, "channels": int(c),
                                     "image_size": int(h) if h == w else [int(h), int(w)],
                                     "splits": disk.splits, "skipped": []})
    return bundle


def own_bundle(data: Any, test: Any = None, val: Any = None, class_names: Sequence[Any] | None = None, *,
               val_split: float = 0.0, seed: int = 0, progress: bool = True) -> DatasetBundle:
    """`train(data=...)`: (images, labels) arrays or a torch Dataset, with optional test and
    validation data of either kind (else stratified hold-outs)."""
    if isinstance(data, DatasetBundle):
        return data
    if _is_arrays(data):
        if test is not None and not _is_arrays(test) or val is not None and not _is_arrays(val):
            return bundle_from_dataset(data, class_names, test=test, val=val, val_split=val_split, seed=seed,
                                       name="arrays", progress=progress)
        return bundle_from_arrays(*data, class_names, test=test, val=val, val_split=val_split, seed=seed)
    if isinstance(data, (tuple, list)):
        raise CnnlabError("data must be (images, labels) arrays or a torch Dataset of (image, label) pairs; got a "
                          f"{type(data).__name__} of {len(data)} items.")
    if not hasattr(data, "__getitem__") and not hasattr(data, "__iter__"):
        raise CnnlabError(f"data must be (images, labels) arrays or a torch Dataset, not a {type(data).__name__}.")
    return bundle_from_dataset(data, class_names, test=test, val=val, val_split=val_split, seed=seed,
                               progress=progress)


def save_split(split: Split, class_names: list[str], directory: Path, name: str = "test") -> None:
    """Write a split as a prepared directory (a run keeps the test split of data given from
    Python this way, so that evaluate and report can score it later)."""
    directory.mkdir(parents=True, exist_ok=True)
    c, h, w = (int(x) for x in split.images.shape[1:])
    writer = SplitWriter(directory, name, len(split), (c, h, w))
    try:
        rows = max(1, FLUSH_BYTES // (c * h * w))
        for start in range(0, len(split), rows):
            chunk = split.images[start:start + rows]
            writer.append(np.ascontiguousarray(chunk.numpy() if isinstance(chunk, torch.Tensor) else chunk),
                          split.labels[start:start + rows].tolist())
    except BaseException:
        writer.abandon()
        raise
    write_meta(directory, {"classes": class_names, "source": name, "channels": c,
                           "image_size": h if h == w else [h, w], "splits": {name: writer.close()}, "skipped": []})


def load_saved_split(directory: Path, name: str) -> DatasetBundle:
    """A split save_split wrote, as a bundle whose test split it is (its images stay on disk)."""
    try:
        meta, splits = open_prepared(directory)
    except DamagedCache as exc:
        raise CnnlabError(f"The saved test images in {directory} are damaged ({exc}).") from None
    images, labels = splits["test"]
    test = Split(images, labels)
    return DatasetBundle(name, list(meta["classes"]), train=test, test=test)
