"""The training setup: what `train`, `lr_find` and the benchmarks build from a TrainConfig before
the first step (device, data, loaders, model, optimiser, schedule, loss, weight average).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..data.batches import BatchLoader, Normalize, channel_stats
from ..data.load import load_dataset
from ..data.split import DatasetBundle, Split, stratified_subset
from ..devices import bf16_supported, resolve_device
from ..errors import InvalidSetting
from ..images.tensors import resize
from ..models.fitting import check_fits
from ..models.init import init_from_run, pretrained_normalisation, pretrained_torchvision
from ..models.registry import check_model_name, check_rebuilds, create_model
from ..models.source import is_import_path, resolve
from ..models.whitening import whiten_first_conv
from . import distributed
from .config import MIN_AUTO_BATCH, MIN_BATCHES, TrainConfig
from .optim import LR_BATCH, Lookahead, ema_with_warmup, make_optimizer, make_schedule

EVAL_BATCH = 1024  # images per forward pass when evaluating: no gradients, so larger is cheaper
WHITEN_SAMPLE = 10_000  # training images whose patches give the whitening filters


@dataclass
class TrainingData:
    """The dataset and the batches drawn from it: this process's shard of the training batches
    (and of a downscaled copy for progressive resizing), and its share of the evaluation splits."""
    config: TrainConfig  # with the batch size and epochs chosen for this training set
    schedule: str  # that choice, in words
    bundle: DatasetBundle
    mean: list[float]  # per channel, of the training images on the 0-1 scale: recorded in the model card
    std: list[float]
    normalize: Normalize
    flip: bool  # random horizontal flips in training, and in flip test-time augmentation
    train_loader: BatchLoader
    low_loader: BatchLoader | None
    val_loader: BatchLoader | None
    test_loader: BatchLoader

    def loader_for(self, epoch: int) -> BatchLoader:
        """The batches of `epoch` (1-based): low resolution first, the last epochs unshifted."""
        config = self.config
        if self.low_loader is not None and epoch <= config.low_res_epochs:
            self.low_loader.epoch = epoch
            return self.low_loader
        self.train_loader.epoch = epoch
        self.train_loader.translate = 0 if epoch > config.epochs - config.translate_off_epochs else config.translate
        return self.train_loader


@dataclass
class TrainingSetup:
    config: TrainConfig
    ctx: distributed.Context
    device: torch.device
    bf16: bool
    data: TrainingData
    model: nn.Module  # the plain model, whose state is saved
    net: nn.Module  # what the training steps run: `model`, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    ema: AveragedModel | None
    lookahead: Lookahead | None
    source_sha256: str | None = None  # of the file defining a user's own model (config.model an import path)
    init_note: str | None = None  # where the starting weights came from, when not from scratch

    @property
    def final(self) -> nn.Module:
        """The weights that are evaluated and saved: the average where one is kept."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def progress(self) -> bool:
        """Progress bars: wanted, and this process is the one that prints."""
        return self.config.progress and self.ctx.main


def build_setup(config: TrainConfig, ctx: distributed.Context = distributed.SINGLE,
                device: torch.device | None = None, *, bundle: DatasetBundle | None = None,
                model: nn.Module | None = None) -> TrainingSetup:
    """Everything training starts from, seeded by config.seed. `device` defaults to config.device;
    `bundle`, where given, is used instead of loading config.dataset (its limit_train still applies);
    `model`, where given, is the instance of config.model to train. The setup's config has the batch
    size and epochs chosen for the data. Every process of a distributed run builds the same and
    starts from rank 0's weights."""
    check_model_name(config.model)  # before minutes of data loading, not after
    if config.batch_size is not None and config.batch_size % ctx.world:
        raise InvalidSetting("batch_size", f"must be divisible by the {ctx.world} processes (it is the global "
                                           f"batch, shared out equally), got {config.batch_size}.")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device) if device is None else device
    torch.manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(device))
    data = load_training_data(config, ctx, device, bundle=bundle)
    config = data.config
    source_sha256 = resolve(config.model)[0].sha256 if is_import_path(config.model) else None

    classes, channels = len(data.bundle.class_names), data.bundle.in_channels
    given, init_note = model is not None, None
    if model is None and config.pretrained:
        model = pretrained_torchvision(config.model, channels, classes, **config.model_args)[0]
        init_note = f"starting from {config.model}'s pretrained weights (classifier head new, {classes} classes)"
    elif model is None:
        model = create_model(config.model, channels, classes, **config.model_args)
    # lazy layers take their shapes from this, and a misfit is one line before any data is moved
    check_fits(model, config.model, channels, data.bundle.image_size, classes)
    if given:  # later commands rebuild it from its class and model_args: that must give the same tensors
        check_rebuilds(model, config.model, config.model_args, channels, data.bundle.image_size, classes)
    if config.init_from:
        init_note = init_from_run(model, config.init_from, architecture=config.model, model_args=config.model_args,
                                  in_channels=channels, class_names=data.bundle.class_names)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if config.whiten and not (config.init_from or config.pretrained):  # trained weights keep their first layer
        whiten(model, data.bundle.train, data.normalize, train_bias=config.whiten_bias_epochs > 0)
    net = distributed.wrap(model, ctx, device, config.sync_bn)
    model = net.module if ctx.active else model
    optimizer = make_optimizer(model, config)
    scheduler = make_schedule(optimizer, config, len(data.train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    ema = None
    if config.ema_decay > 0:  # averages batch-norm buffers too, so the averaged model is usable as is
        ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(config.ema_decay), use_buffers=True)
    lookahead = None
    if config.lookahead_every:
        lookahead = Lookahead(model, config.lookahead_every, config.epochs * len(data.train_loader))
    return TrainingSetup(config, ctx, device, bf16, data, model, net, optimizer, scheduler, loss_fn, ema, lookahead,
                         source_sha256, init_note)


def load_training_data(config: TrainConfig, ctx: distributed.Context, device: torch.device, *,
                       bundle: DatasetBundle | None = None) -> TrainingData:
    if bundle is None:
        bundle = load_dataset(config.dataset, val_split=config.val_split, seed=config.seed,
                              image_size=config.image_size, download=config.download,
                              progress=config.progress and ctx.main, split_folders=config.split_folders or None)
    if config.limit_train is not None:
        bundle.train = bundle.train.subset(stratified_subset(bundle.train.labels, config.limit_train, config.seed))
    config, schedule = choose_schedule(config, len(bundle.train), ctx.world)
    if device.type == "cuda":  # the whole uint8 training set on the GPU: batches never cross the bus
        bundle.train = Split(bundle.train.images.to(device), bundle.train.labels.to(device))
    mean, std = channel_stats(bundle.train.images)
    if config.pretrained:  # pretrained weights expect the normalisation they were trained with
        given = pretrained_normalisation(config.model, bundle.in_channels)
        mean, std = (given[0], given[1]) if given[0] and given[1] else (mean, std)
    normalize = Normalize(mean, std, device, config.channels_last)
    flip = {"on": True, "off": False}.get(config.flip, bundle.allow_flip)
    train_loader, low_loader = _train_loaders(config, bundle, normalize, flip, ctx)
    val_loader = _eval_loader(bundle.val, normalize, ctx) if bundle.val is not None else None
    return TrainingData(config, schedule, bundle, mean, std, normalize, flip, train_loader, low_loader, val_loader,
                        _eval_loader(bundle.test, normalize, ctx))


def choose_schedule(config: TrainConfig, train_images: int, world: int = 1) -> tuple[TrainConfig, str]:
    """The batch size (when not given) and epochs for a training set of this size, and the choice
    in words. A small set gets a smaller batch, and more epochs to reach config.min_steps; the
    warm-up keeps its share of the training."""
    batch, why = config.batch_size, []
    if batch is None:
        batch = config.base_batch
        while batch > MIN_AUTO_BATCH and train_images < MIN_BATCHES * batch:
            batch //= 2
        batch = max(world, batch - batch % world)
        if batch != config.base_batch:
            why.append(f"batch {batch} for {train_images:,} training images")
    steps = max(1, train_images // batch)  # the last partial batch is dropped
    epochs = config.epochs
    if config.min_steps and steps * epochs < config.min_steps:
        epochs = math.ceil(config.min_steps / steps)
        why.append(f"{epochs} epochs instead of {config.epochs} to train at least {config.min_steps} steps")
    chosen = dataclasses.replace(config, batch_size=batch, epochs=epochs,
                                 warmup_epochs=config.warmup_epochs * epochs / config.epochs)
    text = (f"schedule: {epochs} epoch{'' if epochs == 1 else 's'} of {steps} steps ({epochs * steps:,} steps), "
            f"batch {batch}, {chosen.optimizer} at lr {config.lr:g} per {LR_BATCH} images")
    return chosen, text + (f" ({'; '.join(why)})" if why else "")


def _train_loaders(config: TrainConfig, bundle: DatasetBundle, normalize: Normalize, flip: bool,
                   ctx: distributed.Context) -> tuple[BatchLoader, BatchLoader | None]:
    """The training batches (this process's shard of them), and with progressive resizing
    those of a downscaled copy."""
    shard = dict(rank=ctx.rank, world=ctx.world)
    train_loader = BatchLoader(bundle.train, config.batch_size, normalize, shuffle=True, translate=config.translate,
                               flip=flip, alternate_flip=config.alternate_flip, seed=config.seed, drop_last=True,
                               **shard)
    if not (config.low_res and config.low_res_epochs and config.low_res < min(bundle.image_size)):
        return train_loader, None
    # Early epochs on a downscaled copy cost (low/full)^2 of the compute, and the networks
    # (global pooling) take any size. Sharing the generator keeps one seeded data order.
    low = Split(resize(bundle.train.images, (config.low_res, config.low_res)), bundle.train.labels)
    translate = max(1, config.translate * config.low_res // min(bundle.image_size)) if config.translate else 0
    low_loader = BatchLoader(low, config.batch_size, normalize, shuffle=True, translate=translate, flip=flip,
                             alternate_flip=config.alternate_flip, seed=config.seed, drop_last=True, **shard)
    low_loader.generator = train_loader.generator
    return train_loader, low_loader


def _eval_loader(split: Split, normalize: Normalize, ctx: distributed.Context) -> BatchLoader:
    """Evaluation batches of this process's contiguous share of `split` (all of it when alone)."""
    if ctx.active:
        start, end = distributed.shard_rows(len(split), ctx)
        split = split.subset(torch.arange(start, end))
    return BatchLoader(split, EVAL_BATCH, normalize, shuffle=False)


def whiten(model: nn.Module, split: Split, normalize: Normalize, train_bias: bool = False) -> None:
    """config.whiten: the first layer from a fixed sample of the training images (so every
    process of a distributed run agrees), read a few MiB at a time."""
    sample, step = min(len(split), WHITEN_SAMPLE), max(1, 2 ** 16 // math.prod(split.images.shape[2:]))
    whiten_first_conv(model, (normalize(split.images[i:min(i + step, sample)]) for i in range(0, sample, step)),
                      train_bias=train_bias)
