"""`load_dataset(name)`: a built-in dataset by name, or the user's own images as folder:PATH."""

from __future__ import annotations

from ..errors import CnnlabError
from .builtin import get_source, locate_or_download
from .folder import load_folder, peek_shape
from .split import DatasetBundle, stratified_holdout


def load_dataset(name: str, *, val_split: float = 0.1, seed: int = 0, image_size: int | None = None,
                 download: bool = True, progress: bool = True,
                 split_folders: dict[str, str] | None = None) -> DatasetBundle:
    """Load a dataset by name (or folder:PATH) with a seeded, stratified validation hold-out.
    split_folders names the folder of a split of a folder:PATH dataset (see `load_folder`)."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):], val_split=val_split, seed=seed,
                           image_size=image_size, progress=progress, split_folders=split_folders)
    if split_folders:
        raise CnnlabError(f"split_folders applies to folder:PATH datasets, not {name!r}; leave it out.")
    source = get_source(name)
    train, test, classes = source.read(locate_or_download(source, download))
    val = None
    if val_split > 0:
        keep, held = stratified_holdout(train.labels, val_split, seed)
        train, val = train.subset(keep), train.subset(held)
    return DatasetBundle(name, classes, train, test, val, source.allow_flip)


def image_shape(name: str) -> tuple[int, int] | None:
    """(channels, side) of a dataset's images, known without loading it; None when unknown (a folder
    that is not there yet, a name that is not registered)."""
    if name.startswith("folder:"):
        return peek_shape(name[len("folder:"):])
    try:
        return get_source(name).shape
    except CnnlabError:
        return None
