"""The in-memory data path: seeded batches, whole-batch augmentation, normalisation.

The training split stays one uint8 tensor; a batch is an index into it, converted to
float, augmented with tensor ops (random translation, horizontal flip) and normalised
with the mean/std measured on the training split. No per-sample Python work per step.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .split import Split


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, on the 0-1 scale."""
    chunk = max(1, min(chunk, (1 << 20) // max(1, images.shape[1:].numel())))  # <= 8 MiB of float64 a step
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.cpu().tolist(), std.cpu().tolist()


class Normalize:
    """uint8 batch -> normalised float batch on the device, in the chosen memory format."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool):
        self.scale = (1 / (255 * torch.tensor(std))).view(1, -1, 1, 1).to(device)
        self.shift = (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        return (x * self.scale - self.shift).contiguous(memory_format=self.memory_format)


def translate_draws(n: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (dy, dx) offsets in [0, 2 * pad] for n images."""
    return (torch.randint(0, 2 * pad + 1, (n,), generator=gen),
            torch.randint(0, 2 * pad + 1, (n,), generator=gen))


def translate(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Crop each image of the reflect-padded batch at its (dy, dx) offset, as one gather."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = dy.to(x.device), dx.to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `mask` (bool, one per image) is set."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


class BatchLoader:
    """Seeded shuffled batches of (normalised, augmented images, labels) from a split.

    In data-parallel training every rank builds the same loader with its own `rank`: all draw
    the same order and augmentation for each global batch of `batch_size` images, and rank r
    keeps the r-th of `world` equal slices of it, so the ranks' shards are disjoint and
    together are exactly the batch one process would have trained on."""

    def __init__(self, split: Split, batch_size: int, normalize: Normalize, *, shuffle: bool,
                 translate: int = 0, flip: bool = False, alternate_flip: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.split, self.batch_size, self.normalize = split, batch_size, normalize
        self.shuffle, self.translate, self.flip = shuffle, translate, flip
        self.rank, self.world = rank, world
        # Dropping the ragged last batch keeps batch-norm statistics sane; never drop everything.
        self.drop_last = drop_last and len(split) >= batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state = self.generator.get_state()  # the state this epoch's order was drawn from
        self._resume: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # Alternating flip (airbench): each image is mirrored at random in epoch 1 and the other
        # way round in every following epoch, so every two epochs see it both ways; the epoch
        # (1-based) is set by the trainer. The per-image draw has its own generator, so the
        # batch order and other draws are those of random flipping.
        self.epoch = 1
        self.first_flips = None
        if flip and alternate_flip:
            self.first_flips = torch.rand(len(split), generator=torch.Generator().manual_seed(seed + 1)) < 0.5

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state(self) -> dict[str, torch.Tensor]:
        """What resuming at the current batch needs: the epoch's order and the random state now."""
        return {"epoch_state": self.epoch_state, "state": self.generator.get_state()}

    def resume_at(self, state: dict[str, torch.Tensor], batch: int) -> None:
        """Make the next pass continue an interrupted epoch at `batch`, exactly as it would have gone on."""
        self._resume = (state["epoch_state"], state["state"], batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        if self._resume is not None:
            epoch_state, now_state, start = self._resume
            self.generator.set_state(epoch_state if start else now_state)
            self._resume = None
        n = len(self.split)
        self.epoch_state = self.generator.get_state()
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.split.images.device)
        if start:
            self.generator.set_state(now_state)  # the augmentation draws continue where they stopped
        for i in range(start, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            # draws for the whole global batch, in one fixed order, whatever this rank keeps
            shifts = translate_draws(len(index), self.translate, self.generator) if self.translate else None
            flips = torch.rand(len(index), generator=self.generator) < 0.5 if self.flip else None
            if self.first_flips is not None:
                flips = self.first_flips[index.cpu()] ^ (self.epoch % 2 == 0)
            mine = slice(None)
            if self.world > 1:
                per_rank = self.batch_size // self.world
                mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
                index = index[mine]
            x = self.normalize(self.split.images[index])
            if shifts is not None:
                x = translate(x, self.translate, shifts[0][mine], shifts[1][mine])
            if flips is not None:
                x = flip_where(x, flips[mine])
            yield x, self.split.labels[index].to(self.normalize.device, non_blocking=True)
