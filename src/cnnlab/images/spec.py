"""The image spec, torch-free: which files are images, and the test-time augmentation views.

Folder datasets, predict, serve, Grad-CAM and the ONNX runtime all take these from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import CnnlabError

# Extensions picked up when walking folders: torchvision's list plus GIF, which both decoders
# read. Files named explicitly are tried whatever they are called.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ORIENTATION = 0x0112  # the EXIF tag both decoders read an image's rotation from (PIL.ExifTags.Base.Orientation)


class UnreadableImage(CnnlabError):
    """A file or upload that is not an image either decoder can read."""


def is_image_name(name: str) -> bool:
    """A visible file with an image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def walk_images(folder: Path) -> Iterator[Path]:
    """The image files under `folder`, recursively, hidden files and folders left out, in sorted
    order (folders depth-first, names within a folder sorted)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_name(name):
                yield Path(root) / name


class View(NamedTuple):
    """One test-time view of an image: shifted by (dy, dx) pixels (reflect-padded), maybe mirrored."""
    dy: int
    dx: int
    mirrored: bool


# The views each test-time augmentation averages the logits over, in this order. flip-translate
# adds the image shifted one pixel up-left and down-right, and their mirrors.
TTA_VIEWS: dict[str, tuple[View, ...]] = {
    "none": (View(0, 0, False),),
    "flip": (View(0, 0, False), View(0, 0, True)),
    "flip-translate": (View(0, 0, False), View(0, 0, True), View(-1, -1, False), View(1, 1, False),
                       View(-1, -1, True), View(1, 1, True)),
}
TTA_MODES = tuple(TTA_VIEWS)
DEFAULT_TTA = "none"


def tta_views(mode: str, flip: bool = True) -> tuple[View, ...]:
    """The views of a test-time augmentation; mirrored ones only where flips keep labels (`flip`)."""
    if mode not in TTA_VIEWS:
        raise CnnlabError(f"Unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}.")
    return tuple(v for v in TTA_VIEWS[mode] if flip or not v.mirrored)
