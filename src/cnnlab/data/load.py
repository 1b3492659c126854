"""`load_dataset(name)`: a built-in dataset by name, or the user's own images as folder:PATH."""

from __future__ import annotations

from .builtin import get_source, locate_or_download
from .folder import load_folder
from .split import DatasetBundle, stratified_holdout


def load_dataset(name: str, *, val_split: float = 0.1, seed: int = 0, image_size: int | None = None,
                 download: bool = True, progress: bool = True) -> DatasetBundle:
    """Load a dataset by name (or folder:PATH) with a seeded, stratified validation hold-out."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):], val_split=val_split, seed=seed,
                           image_size=image_size, progress=progress)
    source = get_source(name)
    train, test, classes = source.read(locate_or_download(source, download))
    val = None
    if val_split > 0:
        keep, held = stratified_holdout(train.labels, val_split, seed)
        train, val = train.subset(keep), train.subset(held)
    return DatasetBundle(name, classes, train, test, val, source.allow_flip)
