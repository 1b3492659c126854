"""`cnnlab datasets show`: a grid of sample images, one row per class, saved as a PNG.

A look at the data before training: wrong labels, odd crops or a mixed-up folder show at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from ..data.load import load_dataset
from ..data.split import DatasetBundle, Split
from ..errors import CnnlabError, InvalidSetting

SEED = 0  # the same samples every time, so two grids of one dataset compare
ROW_INCHES = (0.45, 1.0)  # height of one class row: smaller when there are many classes
PAD = 2  # pixels between images


@dataclass
class Preview:
    path: Path  # the PNG written
    origin_line: str | None  # which folders became which split, on one line (folder datasets)


def preview_dataset(name: str, out: str | Path | None = None, *, per_class: int = 8, split: str = "train",
                    progress: bool = True, split_folders: dict[str, str] | None = None) -> Preview:
    """Save `per_class` seeded random images of every class of a split (rows labelled with the
    class names); default file <name>-samples.png in the current folder. split_folders: as for
    `load_dataset`."""
    if per_class < 1:
        raise InvalidSetting("per_class", f"must be at least 1, got {per_class}.")
    if split not in ("train", "test"):
        raise InvalidSetting("split", f"must be train or test, got {split!r}.")
    bundle = load_dataset(name, val_split=0, progress=progress, split_folders=split_folders)
    chosen = getattr(bundle, split)
    if len(chosen) == 0:
        raise CnnlabError(f"The {split} split of {name} holds no images.")
    path = Path(out) if out is not None else Path(f"{_file_stem(name)}-samples.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    _figure(bundle, chosen, split, per_class).savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    return Preview(path, bundle.origin_line)


def show_dataset(name: str, out: str | Path | None = None, per_class: int = 8, split: str = "train",
                 progress: bool = True) -> Path:
    """`preview_dataset`, returning only the path of the PNG."""
    return preview_dataset(name, out, per_class=per_class, split=split, progress=progress).path


def _file_stem(name: str) -> str:
    """fashion-mnist -> fashion-mnist; folder:/data/My Photos/ -> folder-My-Photos."""
    if name.startswith("folder:"):
        name = "folder-" + Path(name[len("folder:"):]).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def _rows(split: Split, classes: int, per_class: int) -> list[torch.Tensor]:
    """Per class, a (per_class, C, H, W) uint8 batch of random images, padded with white where
    the class has fewer, so every row of the grid is equally long."""
    gen = torch.Generator().manual_seed(SEED)
    blank = torch.full_like(split.images[:1], 255)
    rows = []
    for cls in range(classes):
        index = torch.nonzero(split.labels == cls).flatten()
        index = index[torch.randperm(len(index), generator=gen)[:per_class]]
        rows.append(torch.cat([split.images[index], blank.expand(per_class - len(index), -1, -1, -1)]))
    return rows


def _figure(bundle: DatasetBundle, split: Split, split_name: str, per_class: int) -> Figure:
    rows = _rows(split, len(bundle.class_names), per_class)
    height, width = split.images.shape[-2:]
    row_inches = min(ROW_INCHES[1], max(ROW_INCHES[0], 10 / len(rows)))
    image_inches = row_inches * per_class * (width + PAD) / (height + PAD)
    fig = Figure(figsize=(1.6 + image_inches, 0.5 + row_inches * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    font = 9 if len(rows) <= 20 else 6
    for ax, row, class_name in zip(axes, rows, bundle.class_names):
        # make_grid repeats a grey channel to RGB and lays the images out with white gaps
        grid = make_grid(row, nrow=per_class, padding=PAD, pad_value=255)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(class_name, rotation=0, ha="right", va="center", fontsize=font)
    fig.suptitle(f"{bundle.name}, {split_name} split: {len(split):,} images, {len(rows)} classes, "
                 f"{per_class} random images per class", fontsize=9)
    return fig
