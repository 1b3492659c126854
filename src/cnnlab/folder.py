"""`folder:PATH` datasets: the user's own images, one sub-folder per class.

Images are decoded once into uint8 tensors and cached on disk as safetensors, keyed by the
folder's file list, sizes and modification times, so later runs skip decoding. Files that
cannot be decoded are skipped, counted in one warning and listed for the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .checkpoint import atomic_write
from .datasets import DatasetBundle, Split, cache_dir, stratified_holdout
from .errors import CnnlabError, first_line
from .images import UnreadableImage, read_image, resize, to_channels
from .predict import IMAGE_EXTENSIONS

CACHE_VERSION = "2"
MAX_AUTO_SIZE = 64  # the default image side is the median side, capped here
SPLIT_NAMES = ("train", "val", "test")
FLAT_HOLDOUT = 0.1  # test fraction of a folder without splits when --val-split is 0
SKIPPED_FILE = "skipped.txt"  # in the run directory: every file left out, with the reason
SHOWN = 3  # classes and files the warning names; skipped.txt lists them all


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e))


def _image_files(class_dir: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split, (file, class index) pairs."""
    has_splits = (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} if has_splits else {"train": root}
    # Classes are the union over splits, sorted, so an empty or missing folder shifts nothing.
    classes = sorted({c for d in split_dirs.values() for c in _class_dirs(d)})
    if not classes:
        raise CnnlabError(f"{root} has no class sub-folders; put each class's images in a folder named after it.")
    files = {split: [(f, i) for i, c in enumerate(classes) if (d / c).is_dir() for f in _image_files(d / c)]
             for split, d in split_dirs.items()}
    if not files["train"]:
        raise CnnlabError(f"{split_dirs['train']} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...).")
    return classes, files


def _cache_key(root: Path, classes: list[str], files: dict[str, list[tuple[Path, int]]],
               image_size: int | None) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}|{image_size}|{json.dumps(classes)}".encode())
    for split in sorted(files):
        for path, label in files[split]:
            st = path.stat()
            line = f"{split}|{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n"
            digest.update(line.encode(errors="surrogateescape"))  # names need not be UTF-8
    return digest.hexdigest()[:32]


def _decode_all(paths: list[Path], progress: bool) -> list[torch.Tensor | str]:
    """Decode every file (threads overlap file reads with decoding); an error string for bad ones."""
    def one(path: Path) -> torch.Tensor | str:
        try:
            return read_image(path)
        except UnreadableImage as exc:
            return first_line(exc)
        except OSError as exc:
            return f"{type(exc).__name__}: {first_line(exc)}"

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(tqdm(pool.map(one, paths, chunksize=64), total=len(paths), desc="decoding images",
                         unit="img", disable=not progress, file=sys.stderr, leave=False))


def _build(root: Path, classes: list[str], files: dict[str, list[tuple[Path, int]]],
           image_size: int | None, progress: bool) -> tuple[dict[str, Split], list[tuple[str, str]]]:
    flat = [(split, path, label) for split in files for path, label in files[split]]
    decoded = _decode_all([path for _, path, _ in flat], progress)
    good = [(s, img, label) for (s, _, label), img in zip(flat, decoded) if isinstance(img, torch.Tensor)]
    skipped = [(str(path.relative_to(root)), img) for (_, path, _), img in zip(flat, decoded) if isinstance(img, str)]
    if not good:
        raise CnnlabError(f"None of the {len(flat)} image files under {root} could be read.")
    channels = 3 if any(img.shape[0] == 3 for _, img, _ in good) else 1
    if image_size is None:
        image_size = min(MAX_AUTO_SIZE, int(statistics.median(max(img.shape[1:]) for _, img, _ in good)))
    size = (image_size, image_size)
    splits = {}
    for split in files:
        items = [(img, label) for s, img, label in good if s == split]
        if not items:
            continue
        images = torch.stack([resize(to_channels(img, channels), size) for img, _ in items])
        splits[split] = Split(images.contiguous(), torch.tensor([label for _, label in items], dtype=torch.int64))
    return splits, skipped


def _save_cache(path: Path, splits: dict[str, Split], classes: list[str], skipped: list[tuple[str, str]]) -> None:
    tensors = {}
    for name, split in splits.items():
        tensors[f"{name}.images"] = split.images
        tensors[f"{name}.labels"] = split.labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"classes": json.dumps(classes), "skipped": json.dumps(skipped)})
    os.replace(tmp, path)


def _load_cache(path: Path) -> tuple[dict[str, Split], list[str], list[tuple[str, str]]] | None:
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        classes, skipped = json.loads(meta["classes"]), [tuple(pair) for pair in json.loads(meta["skipped"])]
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    splits = {s: Split(tensors[f"{s}.images"], tensors[f"{s}.labels"]) for s in SPLIT_NAMES if f"{s}.images" in tensors}
    return splits, classes, skipped


def load_folder(path: str, *, val_split: float = 0.1, seed: int = 0, image_size: int | None = None,
                progress: bool = True) -> DatasetBundle:
    """Load an ImageFolder-style tree; `train/`, `val/`, `test/` sub-folders become splits."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CnnlabError(f"Dataset folder {root} does not exist; pass folder:PATH with a folder of class sub-folders.")
    root = root.resolve()
    classes, files = _scan(root)
    cache = cache_dir() / "folders" / f"{root.name}-{_cache_key(root, classes, files, image_size)}.safetensors"
    cached = _load_cache(cache) if cache.is_file() else None
    if cached is not None:
        splits, classes, skipped = cached
    else:
        splits, skipped = _build(root, classes, files, image_size, progress)
        _save_cache(cache, splits, classes, skipped)
    if skipped:
        print(_skipped_warning(root, skipped, files, classes), file=sys.stderr)
    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    if test is None and val is None:
        # A flat folder: one stratified hold-out is both the validation and the test split;
        # it is needed even when --val-split is 0, so that there is something to test on.
        keep, held = stratified_holdout(train.labels, val_split or FLAT_HOLDOUT, seed)
        train, val = train.subset(keep), train.subset(held)
        test = val
    elif val is None and val_split > 0:
        keep, held = stratified_holdout(train.labels, val_split, seed)
        train, val = train.subset(keep), train.subset(held)
    if test is None:
        test = val  # train/ and val/ but no test/: the validation split is the test split
    return DatasetBundle(f"folder:{root}", classes, train, test, val, allow_flip=True,
                         skipped=[f"{name}: {reason}" for name, reason in skipped])


def _skipped_warning(root: Path, skipped: list[tuple[str, str]], files: dict[str, list[tuple[Path, int]]],
                     classes: list[str]) -> str:
    """One line: how many files were left out, how many per class, and the first few with the reason."""
    class_of = {str(path.relative_to(root)): classes[label] for split in files.values() for path, label in split}
    per_class = Counter(class_of[name] for name, _ in skipped).most_common()
    counts = ", ".join(f"{name} {n}" for name, n in per_class[:SHOWN]) + (", ..." if len(per_class) > SHOWN else "")
    examples = "; ".join(f"{name} ({reason})" for name, reason in skipped[:SHOWN])
    total = sum(len(split) for split in files.values())
    return (f"warning: skipped {len(skipped):,} of {total:,} image files under {root} that could not be read "
            f"(per class: {counts}): {examples}{'; ...' if len(skipped) > SHOWN else ''}")


def write_skipped(run_dir: Path, skipped: list[str] | None) -> None:
    """List a folder dataset's skipped files, one `path: reason` a line, in RUN_DIR/skipped.txt."""
    if skipped:
        text = "".join(f"{line}\n" for line in skipped)
        atomic_write(Path(run_dir) / SKIPPED_FILE,
                     lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))
