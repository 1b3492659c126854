"""The `Split` and `DatasetBundle` types every dataset source returns, and seeded stratified sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prepared import DiskImages


@dataclass
class Split:
    images: torch.Tensor | DiskImages  # uint8 (N, C, H, W); on disk for folder datasets
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        """The rows at `index`; a split on disk stays there (nothing is read)."""
        images = self.images.subset(index) if isinstance(self.images, DiskImages) else self.images[index]
        return Split(images, self.labels[index])


@dataclass
class DatasetBundle:
    name: str
    class_names: list[str]
    train: Split
    test: Split
    val: Split | None = None
    allow_flip: bool = True
    skipped: list[str] | None = None  # files of a folder dataset that could not be read
    origin: dict[str, str] | None = None  # folder datasets: split -> where its images came from

    @property
    def origin_line(self) -> str | None:
        """Where each split came from, on one line, e.g. "folder:/x/flowers: train <- train/
        (540 images), val <- valid/ (60 images), test <- test/ (100 images)"; None without origin."""
        if not self.origin:
            return None
        return f"{self.name}: " + ", ".join(f"{split} <- {source}" for split, source in self.origin.items())

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out): `fraction` of every class held out, chosen by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of about `n` items with the classes in their original proportions."""
    if n >= len(labels):
        return torch.arange(len(labels))
    _, chosen = stratified_holdout(labels, n / len(labels), seed)
    return chosen
