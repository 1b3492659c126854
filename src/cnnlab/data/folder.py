"""`folder:PATH` datasets: the user's own images, one sub-folder per class, optionally inside
split folders (train/, valid/, test/ and the other names tools give them).

The first use converts the folder into a prepared directory of raw uint8 files (prepared.py),
keyed by the folder's file list, sizes and modification times; training reads the rows of each
batch from it, so a dataset need not fit in memory. Files that cannot be decoded are skipped,
counted in one warning and listed for the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import CnnlabError, InvalidSetting, first_line
from ..files import cache_dir
from ..images.spec import IMAGE_EXTENSIONS, UnreadableImage, walk_images
from ..images.tensors import fit, read_image
from .prepared import DamagedCache, SplitWriter, conversion_lock, open_prepared, write_meta
from .split import DatasetBundle, Split, stratified_holdout

CACHE_VERSION = "3"
MAX_AUTO_SIZE = 64  # the default image side is the median side, capped here
# The folder names that tools give each split, compared lower-case. A top-level folder with one
# of these names makes PATH a folder of splits; anywhere else a name is just a class.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
SPLIT_OF_FOLDER = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}
FLAT_HOLDOUT = 0.1  # test fraction of a folder without splits when val_split is 0
SHOWN = 3  # classes and files the warning names; skipped.txt lists them all
CHUNK_BYTES = 2 << 20  # converted rows a worker hands back at once (and what bounds memory)
HEADER_CHUNK = 256  # files per header-reading job
MAX_WORKERS = 8  # default decoding threads: one per CPU, at most this many


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e))


def _relative(root: Path, path: Path) -> Path:
    """A file or folder as the user knows it: relative to the root, or absolute outside it
    (a split folder given by absolute path)."""
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def _shown(root: Path, folder: Path) -> str:
    """A split folder as messages show it: `valid/`, `./` for the root itself, or an absolute path."""
    return "./" if folder == root else f"{_relative(root, folder)}/"


def _split_folders(root: Path, given: dict[str, str] | None) -> dict[str, Path]:
    """The folder of each split, in train, val, test order: the given ones, and for the others
    the top-level folder named like that split; {} for a flat folder of classes."""
    given = given or {}
    unknown = [key for key in given if key not in SPLIT_FOLDER_NAMES]
    if unknown:
        raise CnnlabError(f"split_folders has the key {unknown[0]!r}, which is not a split; "
                          f"use {', '.join(SPLIT_FOLDER_NAMES)}.")
    chosen = {}
    for split, folder in given.items():
        # normpath, not resolve: a folder reached through a link keeps the name the user gave
        path = Path(os.path.normpath(root / Path(folder).expanduser()))
        if not path.is_dir():
            raise CnnlabError(f"split_folders gives {folder!r} as the {split} folder, but {path} is not a folder; "
                              f"give a folder relative to {root} or an absolute one.")
        chosen[split] = path
    if root in chosen.values():
        return _ordered(chosen)  # the root's own sub-folders are classes, whatever their names
    top = _class_dirs(root)
    named: dict[str, list[str]] = {}
    for name in top:
        if name.lower() in SPLIT_OF_FOLDER:
            named.setdefault(SPLIT_OF_FOLDER[name.lower()], []).append(name)
    for split, names in named.items():
        if split not in chosen and len(names) > 1:
            raise CnnlabError(f"{root} has {len(names)} {split} folders ({', '.join(n + '/' for n in names)}); "
                              "keep one of them and merge the others into it.")
    folders = _ordered({**{split: root / names[0] for split, names in named.items()}, **chosen})
    if not folders:
        return {}
    shown = ", ".join(_shown(root, folder) for folder in folders.values())
    if "train" not in folders:
        raise CnnlabError(f"{root} has split folders ({shown}) but no train folder; "
                          "add train/ with one sub-folder per class to learn from.")
    others = [name for name in top if name.lower() not in SPLIT_OF_FOLDER and root / name not in folders.values()]
    if others:
        listed = ", ".join(n + "/" for n in others[:SHOWN]) + (", ..." if len(others) > SHOWN else "")
        raise CnnlabError(f"{root} holds both split folders ({shown}) and other folders ({listed}); move each "
                          f"class folder into the split folders (e.g. {_shown(root, folders['train'])}{others[0]}/) "
                          "or the other folders out.")
    return folders


def _ordered(folders: dict[str, Path]) -> dict[str, Path]:
    return {split: folders[split] for split in SPLIT_FOLDER_NAMES if split in folders}


def _scan(root: Path, split_folders: dict[str, str] | None
          ) -> tuple[list[str], dict[str, Path], dict[str, list[tuple[Path, int]]]]:
    """Class names, the folder of each split ({} for a flat folder) and, per split, (file, class
    index) pairs."""
    folders = _split_folders(root, split_folders)
    split_dirs = folders or {"train": root}
    # Classes are the union over splits, sorted, so an empty or missing folder shifts nothing. A
    # split folder inside another (val <- holdout/ beside the classes of train <- ./) is no class.
    classes = sorted({c for d in split_dirs.values() for c in _class_dirs(d) if d / c not in split_dirs.values()})
    if not classes:
        shown = ", ".join(_shown(root, d) for d in folders.values())
        where = f"The split folders of {root} ({shown}) have" if folders else f"{root} has"
        raise CnnlabError(f"{where} no class sub-folders; put each class's images in a folder named after it.")
    files = {split: [(f, i) for i, c in enumerate(classes) if (d / c).is_dir() for f in walk_images(d / c)]
             for split, d in split_dirs.items()}
    if not files["train"]:
        raise CnnlabError(f"{split_dirs['train']} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...).")
    return classes, folders, files


def _cache_key(root: Path, classes: list[str], files: dict[str, list[tuple[Path, int]]],
               image_size: int | None) -> str:
    # Every file's split is in the key, so choosing other split folders is another cache entry
    # while naming the folder detection would have found anyway keeps the same one.
    digest = hashlib.sha256(f"{CACHE_VERSION}|{image_size}|{json.dumps(classes)}".encode())
    for split in sorted(files):
        for path, label in files[split]:
            st = path.stat()
            line = f"{split}|{_relative(root, path)}|{label}|{st.st_size}|{st.st_mtime_ns}\n"
            digest.update(line.encode(errors="surrogateescape"))  # names need not be UTF-8
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------- decoding (in worker threads)

def _gray(mode: str) -> bool:
    """Pillow modes that read_image returns as one channel."""
    return mode in ("1", "L", "LA", "La", "F", "I") or mode.startswith("I;")


def _decode(path: Path) -> torch.Tensor | str:
    """The decoded image, or why it cannot be read (the text skipped.txt shows)."""
    try:
        return read_image(path)
    except UnreadableImage as exc:
        return first_line(exc)
    except OSError as exc:
        return f"{type(exc).__name__}: {first_line(exc)}"


def _describe(paths: list[Path]) -> list[tuple[int, int] | str]:
    """(channels, longest side) of each file from its header alone, or why it cannot be read."""
    out: list[tuple[int, int] | str] = []
    for path in paths:
        try:
            with Image.open(path) as pil:
                out.append((1 if _gray(pil.mode) else 3, max(pil.size)))
            continue
        except Exception:  # Pillow cannot parse the header: the decoder says what it is, or why not
            pass
        image = _decode(path)
        out.append(image if isinstance(image, str) else (int(image.shape[0]), max(image.shape[1:])))
    return out


def peek_shape(path: str, sample: int = 16) -> tuple[int, int] | None:
    """(channels, median longest side) of the first `sample` images under `path` from their headers,
    or None where there are none: what a run on the folder would look like, without loading it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    shapes = [d for d in _describe([p for _, p in zip(range(sample), walk_images(root))]) if not isinstance(d, str)]
    if not shapes:
        return None
    return max(c for c, _ in shapes), int(np.median([side for _, side in shapes]))


def _convert_chunk(paths: list[Path], channels: int, size: int) -> tuple[Any, ...]:
    """Decode and resize a run of files exactly as an in-memory dataset would be: the rows of
    the good ones, their shapes as decoded, and (position, reason) failures."""
    good, rows, shapes, failed = [], [], [], []
    for i, path in enumerate(paths):
        image = _decode(path)
        if isinstance(image, str):
            failed.append((i, image))
            continue
        good.append(i)
        shapes.append((int(image.shape[0]), max(image.shape[1:])))
        rows.append(fit(image, channels, (size, size)))
    data = torch.stack(rows).numpy() if rows else np.empty((0, channels, size, size), np.uint8)
    return good, data, shapes, failed


def _pool(workers: int) -> Executor:
    """Decoding threads. Not processes: their results would come back pickled, and cnnlab
    unpickles nothing (test_security audits it); libjpeg, libpng and resizing release the GIL."""
    return ThreadPoolExecutor(workers, thread_name_prefix="cnnlab-decode")


def _in_order(pool: Executor, fn: Callable[..., Any], jobs: Iterable[tuple], ahead: int) -> Iterator[Any]:
    """fn(*job) for every job on the pool, results in order, with at most `ahead` jobs out at once
    (which bounds the memory of finished results waiting for a slow one)."""
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# ---------------------------------------------------------------- conversion

def _decide(root: Path, channels: np.ndarray, sides: np.ndarray, image_size: int | None) -> tuple[int, int]:
    """Over the readable images (channels > 0): 3 channels if any has colour, else 1; the side
    as given, or the median longest side capped at MAX_AUTO_SIZE."""
    ok = channels > 0
    if not ok.any():
        raise CnnlabError(f"None of the {len(channels)} image files under {root} could be read.")
    side = image_size if image_size is not None else min(MAX_AUTO_SIZE, int(np.median(sides[ok])))
    return (3 if bool((channels == 3).any()) else 1), side


def _convert(root: Path, files: dict[str, list[tuple[Path, int]]], image_size: int | None, workers: int,
             progress: bool, out: Path, heartbeat: Callable[[], None]) -> dict[str, Any]:
    """Write the prepared directory `out`: header pass, then decode + resize in parallel straight
    into each split's file; returns the meta it wrote."""
    items = [(split, path, label) for split in files for path, label in files[split]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decoding threads are the parallelism; torch's own would contend
    try:
        with _pool(workers) as pool:
            return _convert_with(pool, root, items, image_size, workers, progress, out, heartbeat)
    finally:
        torch.set_num_threads(threads)


def _convert_with(pool: Executor, root: Path, items: list[tuple[str, Path, int]], image_size: int | None,
                  workers: int, progress: bool, out: Path, heartbeat: Callable[[], None]) -> dict[str, Any]:
    bar = dict(unit="img", disable=not progress, file=sys.stderr, leave=False)
    failed, channels, sides = _read_headers(pool, items, workers, bar, heartbeat)
    plan = _decide(root, channels, sides, image_size)
    for _ in range(2):
        splits, decoded, newly_failed = _write_splits(pool, items, failed, plan, workers, out, bar, heartbeat)
        failed.update(newly_failed)
        decided = _decide(root, *decoded, image_size)
        if decided == plan:
            break
        # A header disagreed with its image, or a file with a good header failed to decode and
        # that tipped the decision: convert again with what the decoder said (rare).
        plan = decided
    else:
        raise CnnlabError(f"The images under {root} changed while they were being converted; run again.")
    skipped = [(str(_relative(root, items[i][1])), reason) for i, reason in sorted(failed.items())]
    return {"source": str(root), "channels": plan[0], "image_size": plan[1], "splits": splits, "skipped": skipped}


def _read_headers(pool: Executor, items: list[tuple[str, Path, int]], workers: int, bar: dict[str, Any],
                  heartbeat: Callable[[], None]) -> tuple[dict[int, str], np.ndarray, np.ndarray]:
    """Failures (position: reason) and, per file, channels and longest side (0 where unreadable)
    from the image headers: the size and channel count are decided before any pixels are held."""
    paths = [path for _, path, _ in items]
    failed: dict[int, str] = {}
    channels, sides = np.zeros(len(items), np.int8), np.zeros(len(items), np.int32)
    starts = range(0, len(paths), HEADER_CHUNK)
    jobs = ((paths[i:i + HEADER_CHUNK],) for i in starts)
    with tqdm(total=len(items), desc="reading image headers", **bar) as meter:
        for start, described in zip(starts, _in_order(pool, _describe, jobs, 4 * workers)):
            for i, info in enumerate(described, start):
                if isinstance(info, str):
                    failed[i] = info
                else:
                    channels[i], sides[i] = info
            meter.update(len(described))
            heartbeat()
    return failed, channels, sides


def _write_splits(pool: Executor, items: list[tuple[str, Path, int]], failed: dict[int, str],
                  plan: tuple[int, int], workers: int, out: Path, bar: dict[str, Any], heartbeat: Callable[[], None]
                  ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray], dict[int, str]]:
    """Decode every file not known to fail into its split's file (good ones only, in order):
    per-split meta, (channels, longest side) of each image as decoded, and new failures."""
    channels, size = plan
    per_chunk = max(1, min(256, CHUNK_BYTES // (channels * size * size)))
    decoded = (np.zeros(len(items), np.int8), np.zeros(len(items), np.int32))
    newly_failed: dict[int, str] = {}
    splits: dict[str, Any] = {}
    todo = len(items) - len(failed)
    with tqdm(total=todo, desc=f"converting to {size}x{size}x{channels}", **bar) as meter:
        for split in dict.fromkeys(s for s, _, _ in items):
            index = [i for i, (s, _, _) in enumerate(items) if s == split and i not in failed]
            if not index:
                continue
            writer = SplitWriter(out, split, len(index), (channels, size, size))
            try:
                chunks = [index[k:k + per_chunk] for k in range(0, len(index), per_chunk)]
                jobs = (([items[i][1] for i in chunk], channels, size) for chunk in chunks)
                for chunk, (good, data, shapes, bad) in zip(
                        chunks, _in_order(pool, _convert_chunk, jobs, 2 * workers + 2)):
                    writer.append(data, [items[chunk[g]][2] for g in good])
                    for g, (c, side) in zip(good, shapes):
                        decoded[0][chunk[g]], decoded[1][chunk[g]] = c, side
                    newly_failed.update((chunk[b], reason) for b, reason in bad)
                    meter.update(len(chunk))
                    heartbeat()
            except BaseException:
                writer.abandon()
                raise
            info = writer.close()
            if info["count"]:
                splits[split] = info
            else:
                writer.remove()
    return splits, decoded, newly_failed


# ---------------------------------------------------------------- the cache directory

def _open_cache(directory: Path) -> tuple[dict[str, Any], dict[str, Split]] | None:
    """A prepared directory's meta and its splits (on disk), or None when it is missing or damaged."""
    if not directory.is_dir():
        return None
    try:
        meta, splits = open_prepared(directory)
    except DamagedCache:  # rebuilt, never trusted
        return None
    return meta, {name: Split(images, labels) for name, (images, labels) in splits.items()}


def _publish(root: Path, files: dict[str, list[tuple[Path, int]]], image_size: int | None, workers: int,
             progress: bool, final: Path, heartbeat: Callable[[], None], classes: list[str]) -> None:
    """Convert into a temporary directory beside `final` and rename it into place when complete,
    so that no reader, in this process or another, ever sees a half-written cache."""
    for leftover in final.parent.glob(f"{final.name}.tmp-*"):  # of a conversion that crashed
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():  # damaged
        shutil.rmtree(final, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        meta = _convert(root, files, image_size, workers, progress, tmp, heartbeat)
        write_meta(tmp, {"classes": classes, **meta})
        os.rename(tmp, final)
    except OSError as exc:
        raise CnnlabError(f"Cannot write the prepared dataset to {final.parent}: {exc.strerror or exc}; "
                          "set CNNLAB_CACHE to a writable folder with room.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class PreparedFolder:
    """A folder dataset converted to raw uint8 files: what `cnnlab datasets prepare` reports."""
    root: Path
    cache: Path  # the directory with meta.json and the raw split files
    classes: list[str]
    counts: dict[str, int]  # images per split, as on disk (before any hold-out)
    channels: int
    image_size: int
    nbytes: int  # of the image files
    skipped: list[tuple[str, str]]  # (file relative to root, reason)
    seconds: float  # spent converting; 0 when the cache was there already
    converted: bool
    folders: dict[str, str]  # split -> its folder as shown ("valid/"); {} when the root's sub-folders are the classes


def _prepared(path: str, image_size: int | None, workers: int | None, progress: bool,
              split_folders: dict[str, str] | None) -> tuple[PreparedFolder, dict[str, Split]]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CnnlabError(f"Dataset folder {root} does not exist; pass folder:PATH with a folder of class sub-folders.")
    if image_size is not None and image_size < 1:
        raise InvalidSetting("image_size", f"must be at least 1 pixel, got {image_size}.")
    if workers is not None and workers < 1:
        raise InvalidSetting("workers", f"must be at least 1, got {workers}.")
    workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    root = root.resolve()
    classes, folders, files = _scan(root, split_folders)
    final = cache_dir() / "folders" / f"{root.name}-{_cache_key(root, classes, files, image_size)}"
    start = time.perf_counter()
    found = _open_cache(final)
    converted = False
    if found is None:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CnnlabError(f"Cannot create the dataset cache {final.parent}: {exc.strerror or exc}; "
                              "set CNNLAB_CACHE to a writable folder.") from None
        with conversion_lock(final.with_name(final.name + ".lock"), str(root)) as heartbeat:
            found = _open_cache(final)  # another process may have converted it while this one waited
            if found is None:
                _publish(root, files, image_size, workers, progress, final, heartbeat, classes)
                converted = True
                found = _open_cache(final)
        if found is None:
            raise CnnlabError(f"The prepared dataset in {final} cannot be read back; check the disk.")
    meta, splits = found
    skipped = [(name, reason) for name, reason in meta["skipped"]]
    if skipped:
        print(_skipped_warning(root, skipped, files, classes), file=sys.stderr)
    if "train" not in splits:
        where = _shown(root, folders["train"]) if folders else "its class folders"
        raise CnnlabError(f"None of the image files in {where} under {root} could be read; "
                          "add readable images to learn from.")
    counts = {name: len(split) for name, split in splits.items()}
    prepared = PreparedFolder(root, final, meta["classes"], counts, meta["channels"], meta["image_size"],
                              sum(counts.values()) * meta["channels"] * meta["image_size"] ** 2, skipped,
                              time.perf_counter() - start if converted else 0.0, converted,
                              {split: _shown(root, folder) for split, folder in folders.items()})
    return prepared, splits


def prepare_folder(path: str, *, image_size: int | None = None, workers: int | None = None,
                   progress: bool = True, split_folders: dict[str, str] | None = None) -> PreparedFolder:
    """Convert a folder dataset to its prepared cache (or find it done): what the first
    `load_folder` would do, as a step of its own. workers: decoding threads (default: one per CPU);
    split_folders as for `load_folder`."""
    return _prepared(path, image_size, workers, progress, split_folders)[0]


def load_folder(path: str, *, val_split: float = 0.1, seed: int = 0, image_size: int | None = None,
                progress: bool = True, split_folders: dict[str, str] | None = None) -> DatasetBundle:
    """Load an ImageFolder-style tree: class sub-folders, or split folders of class sub-folders.

    Top-level folders named like a split (any case of a name in SPLIT_FOLDER_NAMES: valid/,
    Test/, ...) are splits. Without a val folder, `val_split` of train is held out; without a test
    folder, val is also the test split. split_folders ({"val": "holdout"}, paths relative to `path`
    or absolute) names the folder of a split instead; {"train": "."} reads the root's sub-folders
    as classes whatever their names. bundle.origin records which folder became which split.

    The images stay on disk, in the prepared cache (converted on first use); hold-outs select rows
    without reading them."""
    prepared, splits = _prepared(path, image_size, None, progress, split_folders)
    root, classes, skipped = prepared.root, prepared.classes, prepared.skipped
    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    source = prepared.folders.get("train", "the class folders")
    origin = {"train": f"{source} ({len(train):,} images)"}
    if val is None and (test is None or val_split > 0):
        # A flat folder (or train/ alone) needs the hold-out even when val_split is 0, so that
        # there is something to test on.
        fraction = val_split if test is not None else val_split or FLAT_HOLDOUT
        keep, held = stratified_holdout(train.labels, fraction, seed)
        train, val = train.subset(keep), train.subset(held)
        share = f"{fraction * 100:g}%"
        origin = {"train": f"{source} less a {share} stratified hold-out ({len(train):,} images)",
                  "val": f"{share} stratified hold-out of {source} ({len(val):,} images)"}
    elif val is not None:
        origin["val"] = f"{prepared.folders['val']} ({len(val):,} images)"
    if test is None:
        test = val  # no test folder: the validation split is the test split
        origin["test"] = "same as val"
    else:
        origin["test"] = f"{prepared.folders['test']} ({len(test):,} images)"
    return DatasetBundle(f"folder:{root}", classes, train, test, val, allow_flip=True,
                         skipped=[f"{name}: {reason}" for name, reason in skipped], origin=origin)


def _skipped_warning(root: Path, skipped: list[tuple[str, str]], files: dict[str, list[tuple[Path, int]]],
                     classes: list[str]) -> str:
    """One line: how many files were left out, how many per class, and the first few with the reason."""
    class_of = {str(_relative(root, path)): classes[label] for split in files.values() for path, label in split}
    per_class = Counter(class_of[name] for name, _ in skipped).most_common()
    counts = ", ".join(f"{name} {n}" for name, n in per_class[:SHOWN]) + (", ..." if len(per_class) > SHOWN else "")
    examples = "; ".join(f"{name} ({reason})" for name, reason in skipped[:SHOWN])
    total = sum(len(split) for split in files.values())
    return (f"warning: skipped {len(skipped):,} of {total:,} image files under {root} that could not be read "
            f"(per class: {counts}): {examples}{'; ...' if len(skipped) > SHOWN else ''}")
