"""`train(config) -> run_dir`: data, model, optimiser and schedule around the epoch loop.

Writes the run directory: config.yaml, metrics.jsonl, checkpoint.pt each epoch, then
model.safetensors + model.json and summary.json.
"""

from __future__ import annotations

import json
import math
import re
import resource
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from . import __version__, distributed
from .checkpoint import CHECKPOINT_FILE, atomic_write, load_checkpoint, save_checkpoint, save_model, write_json
from .config import TrainConfig, load_yaml, make_config, save_yaml
from .data import BatchLoader, Normalize, channel_stats
from .datasets import DatasetBundle, Split, load_dataset, stratified_subset
from .engine import Totals, TrainingDiverged, predict_logits, train_one_epoch
from .errors import CnnlabError
from .folder import write_skipped
from .images import resize
from .models import check_model_name, count_parameters, create_model, whiten_first_conv
from .tblog import TensorBoardLog, require_tensorboard

EVAL_BATCH = 1024  # images per forward pass when evaluating: no gradients, so larger is cheaper
WHITEN_SAMPLE = 10_000  # training images whose patches give the --whiten filters


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CnnlabError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CnnlabError("--device mps was asked for, but this machine has no Apple GPU; use --device cpu.")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast runs on native hardware (AVX512-BF16/AMX CPUs, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_run_dir(config: TrainConfig) -> Path:
    dataset = "folder-" + Path(config.dataset[7:]).name if config.dataset.startswith("folder:") else config.dataset
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{_slug(dataset)}-{_slug(config.model)}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Norm weights and biases are not decayed: shrinking them only fights batch norm.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.lr * config.batch_size / 256
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up from 1/10 of the peak, then linear/cosine decay to 0."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _ema_with_warmup(decay: float):
    """EMA whose decay ramps up as (1 + n) / (10 + n) towards `decay`: without the ramp the
    random initial weights linger in the average for hundreds of steps."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor | int) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        pairs = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as num_batches_tracked
                a.copy_(c)
    return update


def peak_rss_mib() -> int:
    """This process's peak resident memory, MiB. VmHWM where /proc has it: on Linux ru_maxrss
    keeps, across exec, the peak of the process that forked this one (a launcher's, a test
    runner's), so it can exceed what this process ever used."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) // 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _log(text: str) -> None:
    print(text, flush=True)


def _quiet(text: str) -> None:
    """What processes other than rank 0 print: nothing."""


def _prepare_data(config: TrainConfig, progress: bool) -> DatasetBundle:
    bundle = load_dataset(config.dataset, val_split=config.val_split, seed=config.seed,
                          image_size=config.image_size, download=config.download, progress=progress)
    if config.limit_train is not None:
        bundle.train = bundle.train.subset(stratified_subset(bundle.train.labels, config.limit_train, config.seed))
    return bundle


def _train_loaders(config: TrainConfig, bundle: DatasetBundle, normalize: Normalize, flip: bool,
                   ctx: distributed.Context) -> tuple[BatchLoader, BatchLoader | None]:
    """The training batches (this process's shard of them), and with progressive resizing
    those of a downscaled copy."""
    shard = dict(rank=ctx.rank, world=ctx.world)
    train_loader = BatchLoader(bundle.train, config.batch_size, normalize, shuffle=True, translate=config.translate,
                               flip=flip, seed=config.seed, drop_last=True, **shard)
    if not (config.low_res and config.low_res_epochs and config.low_res < min(bundle.image_size)):
        return train_loader, None
    # Early epochs on a downscaled copy cost (low/full)^2 of the compute, and the networks
    # (global pooling) take any size. Sharing the generator keeps one seeded data order.
    low = Split(resize(bundle.train.images, (config.low_res, config.low_res)), bundle.train.labels)
    translate = max(1, config.translate * config.low_res // min(bundle.image_size)) if config.translate else 0
    low_loader = BatchLoader(low, config.batch_size, normalize, shuffle=True, translate=translate, flip=flip,
                             drop_last=True, **shard)
    low_loader.generator = train_loader.generator
    return train_loader, low_loader


def _eval_loader(split: Split, normalize: Normalize, ctx: distributed.Context) -> BatchLoader:
    """Evaluation batches of this process's contiguous share of `split` (all of it when alone)."""
    if ctx.active:
        start, end = distributed.shard_rows(len(split), ctx)
        split = split.subset(torch.arange(start, end))
    return BatchLoader(split, EVAL_BATCH, normalize, shuffle=False)


def _accuracy(ctx: distributed.Context, model: nn.Module, loader: BatchLoader, **kw: Any) -> float:
    """Accuracy over the whole split: each process scores its share, the counts are summed."""
    correct, total = 0, 0
    if len(loader.split):  # a process's share can be empty when a split has fewer images than processes
        logits, labels = predict_logits(model, loader, **kw)
        correct, total = (logits.argmax(1) == labels).sum(), len(labels)
    correct, total = distributed.sum_across(ctx, correct, total)
    return correct / total if total else float("nan")


def whiten(model: nn.Module, split: Split, normalize: Normalize) -> None:
    """--whiten: the first layer from a fixed sample of the training images (so every process
    of a distributed run agrees), read a few MiB at a time."""
    sample, step = min(len(split), WHITEN_SAMPLE), max(1, 2 ** 16 // math.prod(split.images.shape[2:]))
    whiten_first_conv(model, (normalize(split.images[i:min(i + step, sample)]) for i in range(0, sample, step)))


def train(config: TrainConfig | None = None, /, *, resume: str | Path | None = None, **overrides: Any) -> Path:
    """Train a model; returns the run directory. Keyword arguments are TrainConfig fields.

    resume: a run directory to continue from its last checkpoint (mid-epoch included) with its
    own config.yaml; the result equals an uninterrupted run's on the same machine.

    Started by torchrun (or `cnnlab train --nproc N`), each process trains its shard of every
    batch with DistributedDataParallel and rank 0 alone writes the run directory."""
    state = None
    if resume is not None:
        config, state = _resume_state(Path(resume), overrides)
        if state is None:
            _log(f"{resume} has finished training already (summary.json is there); nothing to do.")
            return Path(resume)
    else:
        config = make_config(**overrides) if config is None else make_config(**{**config.to_dict(), **overrides})
    check_model_name(config.model)  # before minutes of data loading, not after
    if config.tensorboard:
        require_tensorboard()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    distributed.check_sync_bn(config.sync_bn, device)
    ctx, device = distributed.setup(device, config.dist_timeout)
    run_dir: Path | None = Path(resume) if resume is not None else None
    try:
        return _train(config, state, run_dir, ctx, device)
    except CnnlabError:
        raise
    except Exception as exc:
        if ctx.active and distributed.is_peer_failure(exc):
            raise CnnlabError(distributed.peer_failure_message(run_dir or config.out or "the run directory", exc)) from None
        raise
    finally:
        distributed.teardown()


def _train(config: TrainConfig, state: dict[str, Any] | None, run_dir: Path | None, ctx: distributed.Context,
           device: torch.device) -> Path:
    log = _log if ctx.main else _quiet
    if config.batch_size % ctx.world:
        raise CnnlabError(f"--batch-size {config.batch_size} must be divisible by the {ctx.world} processes "
                          "(it is the global batch, shared out equally).")
    torch.manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(device))

    # data
    bundle = _prepare_data(config, progress=config.progress and ctx.main)
    if device.type == "cuda":  # the whole uint8 training set on the GPU: batches never cross the bus
        bundle.train = Split(bundle.train.images.to(device), bundle.train.labels.to(device))
    mean, std = channel_stats(bundle.train.images)
    normalize = Normalize(mean, std, device, config.channels_last)
    flip = {"on": True, "off": False}.get(config.flip, bundle.allow_flip)
    train_loader, low_loader = _train_loaders(config, bundle, normalize, flip, ctx)
    val_loader = _eval_loader(bundle.val, normalize, ctx) if bundle.val is not None else None
    test_loader = _eval_loader(bundle.test, normalize, ctx)

    # model, optimiser, schedule (DDP starts every process from rank 0's weights)
    model = create_model(config.model, bundle.in_channels, len(bundle.class_names), **config.model_args)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if config.whiten:
        whiten(model, bundle.train, normalize)
    net = distributed.wrap(model, ctx, device, config.sync_bn)  # what the training steps run
    model = net.module if ctx.active else model
    optimizer = make_optimizer(model, config)
    scheduler = make_schedule(optimizer, config, len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    ema = None
    if config.ema_decay > 0:  # averages batch-norm buffers too, so the averaged model is usable as is
        ema = AveragedModel(model, multi_avg_fn=_ema_with_warmup(config.ema_decay), use_buffers=True)
    final = ema.module if ema is not None else model  # the weights that are evaluated and saved

    progress = _Progress()
    if state is not None:
        progress = _restore(state, model, optimizer, scheduler, ema, run_dir, ctx)
        log(f"resuming {run_dir} at epoch {progress.epochs_done + 1}, batch {progress.step + 1}")
    else:
        run_dir = distributed.broadcast_object(ctx, Path(config.out) if config.out else default_run_dir(config))
        problem = _start_run_dir(run_dir, config, bundle) if ctx.main else None
        problem = distributed.broadcast_object(ctx, problem)  # every process stops, not only rank 0
        if problem:
            raise CnnlabError(problem)
    tensorboard = TensorBoardLog(run_dir / "tensorboard") if config.tensorboard and ctx.main else None
    processes = f", {ctx.world} processes" if ctx.active else ""
    log(f"training {config.model} ({count_parameters(model):,} parameters) on {bundle.name}: "
        f"{len(bundle.train):,} train / {len(bundle.val) if bundle.val else 0:,} val / {len(bundle.test):,} test images, "
        f"{device.type}{' bf16' if bf16 else ''}{processes} -> {run_dir}")

    def checkpoint(loader: BatchLoader, totals: Totals | None = None, step: int = 0) -> None:
        """Save the training state; mid-epoch (step > 0) with the epoch's running sums (every
        process's, in a distributed run). Every process calls this; rank 0 writes."""
        if totals is not None and not torch.isfinite(totals.loss):
            raise TrainingDiverged(f"The loss became {totals.loss.item()} in epoch {progress.epochs_done + 1}")
        progress.step = step
        sums = None if totals is None else {"loss": totals.loss.cpu(), "correct": totals.correct.cpu(),
                                            "seen": totals.seen, "seconds": totals.seconds}
        rngs = distributed.gather_objects(ctx, (torch.get_rng_state(), sums))
        if not ctx.main:
            return
        save_checkpoint(run_dir / CHECKPOINT_FILE, {
            "epochs_done": progress.epochs_done, "step": progress.step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "scheduler": scheduler.state_dict(), "loader": loader.state(),
            "torch_rng": rngs[0][0] if not ctx.active else [r for r, _ in rngs],
            "totals": sums if not ctx.active else [t for _, t in rngs], "world": ctx.world,
            "train_seconds": progress.train_seconds, "images_seen": progress.images_seen,
            "best_val": progress.best_val})

    try:
        for epoch in range(progress.epochs_done + 1, config.epochs + 1):
            loader = low_loader if low_loader is not None and epoch <= config.low_res_epochs else train_loader
            if loader is train_loader:  # the last epochs may see the images unshifted
                loader.translate = 0 if epoch > config.epochs - config.translate_off_epochs else config.translate
            totals = None
            if progress.step:  # an interrupted epoch: same order, same random draws, same sums
                loader.resume_at(progress.loader_state, progress.step)
                totals = Totals(progress.totals["loss"].to(device), progress.totals["correct"].to(device),
                                progress.totals["seen"], progress.totals["seconds"])
            elif progress.loader_state is not None:
                loader.resume_at(progress.loader_state, 0)

            def after_step(step: int, sums: Totals, loader: BatchLoader = loader) -> None:
                every = config.checkpoint_every_steps
                if every and (step + 1) % every == 0 and step + 1 < len(loader):
                    checkpoint(loader, sums, step + 1)

            stats = train_one_epoch(net, loader, optimizer, scheduler, loss_fn, bf16=bf16, epoch=epoch, ema=ema,
                                    progress=config.progress and ctx.main, start=progress.step, totals=totals,
                                    after_step=after_step)
            if ctx.active:  # the epoch's loss and accuracy over all processes' images
                loss_sum, correct, seen = distributed.sum_across(ctx, stats.loss * stats.images,
                                                                 stats.accuracy * stats.images, stats.images)
                stats.loss, stats.accuracy, stats.images = loss_sum / seen, correct / seen, int(seen)
                distributed.sync_buffers(ctx, model)  # one set of batch-norm statistics: rank 0's
            progress.loader_state, progress.step = None, 0
            progress.train_seconds += stats.seconds
            progress.images_seen += stats.images
            val_acc = _accuracy(ctx, final, val_loader, bf16=bf16) if val_loader else None
            if val_acc is not None and not val_acc <= progress.best_val:
                progress.best_val = val_acc
            record = {"epoch": epoch, "elapsed_seconds": round(progress.train_seconds, 3), "train_loss": stats.loss,
                      "train_accuracy": stats.accuracy, "val_accuracy": val_acc,
                      "lr": optimizer.param_groups[0]["lr"], "images_per_second": round(stats.images_per_second, 1)}
            if config.eval_test:
                record["test_accuracy"] = _accuracy(ctx, final, test_loader, bf16=bf16, tta=config.tta, flip=flip)
            if ctx.main:
                _append_metrics(run_dir, record)
                if tensorboard is not None:
                    tensorboard.log_epoch(record)
            progress.epochs_done = epoch
            checkpoint(loader)
            val_text = f", val acc {val_acc:.4f}" if val_acc is not None else ""
            log(f"epoch {epoch}/{config.epochs}: loss {stats.loss:.4f}, train acc {stats.accuracy:.4f}{val_text}, "
                f"{stats.images_per_second:.0f} img/s, {progress.train_seconds:.1f}s")
    except TrainingDiverged as exc:
        kept = (f"the last good checkpoint (it resumes at epoch {progress.epochs_done + 1}, batch "
                f"{progress.step + 1}) is kept in {run_dir}" if (run_dir / CHECKPOINT_FILE).is_file() else "no checkpoint had been written yet")
        raise TrainingDiverged(f"{exc}; training stopped and {kept}. Lower the learning rate (--lr) and "
                               "start again.") from None
    finally:
        if tensorboard is not None:
            tensorboard.close()

    # fp32 here, as evaluate, predict and exported models run: the figures must agree
    test_acc = _accuracy(ctx, final, test_loader, bf16=False, tta=config.tta, flip=flip)
    peak_rss = distributed.gather_objects(ctx, peak_rss_mib())
    if not ctx.main:
        return run_dir
    # weights, with the preprocessing facts they need
    save_model(final, {
        "architecture": config.model, "model_args": config.model_args, "num_classes": len(bundle.class_names),
        "class_names": bundle.class_names, "in_channels": bundle.in_channels, "image_size": list(bundle.image_size),
        "mean": mean, "std": std, "dataset": bundle.name, "cnnlab_version": __version__,
        "tta": config.tta, "tta_flip": flip, "recipe": config.recipe,
    }, run_dir)
    summary = {"test_accuracy": test_acc,
               "best_val_accuracy": None if math.isnan(progress.best_val) else progress.best_val,
               "train_seconds": round(progress.train_seconds, 3), "epochs": config.epochs,
               "images_per_second": round(progress.images_seen / max(progress.train_seconds, 1e-9), 1),
               "params": count_parameters(model), "dataset": bundle.name, "model": config.model,
               "device": device.type, "bf16": bf16, "train_images": len(bundle.train), "processes": ctx.world,
               "peak_rss_mib": peak_rss,  # one figure per process
               "skipped_files": len(bundle.skipped or []),
               "finished": datetime.now().isoformat(timespec="seconds")}
    write_json(run_dir / "summary.json", summary)
    log(f"test accuracy {test_acc:.4f} after {progress.train_seconds:.1f}s of training; run directory {run_dir}")
    return run_dir


def _start_run_dir(run_dir: Path, config: TrainConfig, bundle: DatasetBundle) -> str | None:
    """Create a new run directory with its config.yaml; a problem is returned as one sentence."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: save_yaml(config, tmp))
        atomic_write(run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(""))
        write_skipped(run_dir, bundle.skipped)
    except OSError as exc:
        return f"Cannot write {run_dir}: {exc.strerror or exc}."
    except CnnlabError as exc:
        return str(exc)
    return None


@dataclass
class _Progress:
    """Where training stands: what a checkpoint records beyond the model and optimiser."""
    epochs_done: int = 0
    step: int = 0  # batches done in epoch epochs_done + 1
    train_seconds: float = 0.0
    images_seen: int = 0
    best_val: float = float("nan")
    loader_state: dict[str, torch.Tensor] | None = None
    totals: dict[str, Any] | None = None


def _resume_state(run_dir: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and its last checkpoint (None when the run has finished)."""
    if not (run_dir / "config.yaml").is_file():
        raise CnnlabError(f"{run_dir} is not a cnnlab run directory (no config.yaml); nothing to resume.")
    config = make_config(**{**load_yaml(run_dir / "config.yaml"), **overrides})
    if (run_dir / "summary.json").is_file():
        return config, None
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise CnnlabError(f"{run_dir} has no {CHECKPOINT_FILE} yet (it stopped before its first checkpoint); "
                          "start it again instead.")
    return config, load_checkpoint(run_dir / CHECKPOINT_FILE)


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             ema: AveragedModel | None, run_dir: Path, ctx: distributed.Context) -> _Progress:
    """Load a checkpoint into the training objects; metrics.jsonl keeps only the epochs it covers."""
    written_by = state.get("world", 1)
    if state.get("step") and written_by != ctx.world:
        raise CnnlabError(f"{run_dir / CHECKPOINT_FILE} was saved mid-epoch by {written_by} process(es); resume it "
                          f"with {written_by} (an end-of-epoch checkpoint resumes with any number).")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        rng, totals = state["torch_rng"], state["totals"]
        if isinstance(rng, list):  # a distributed run's: one per process
            rng, totals = rng[ctx.rank % len(rng)], totals[ctx.rank % len(totals)]
        torch.set_rng_state(rng)
        progress = _Progress(state["epochs_done"], state["step"], state["train_seconds"], state["images_seen"],
                             state["best_val"], state["loader"], totals)
    except (KeyError, TypeError, RuntimeError, ValueError, IndexError) as exc:
        raise CnnlabError(f"{run_dir / CHECKPOINT_FILE} does not fit this run's model and settings "
                          f"({type(exc).__name__}); start it again instead.") from None
    if ctx.main:
        records = [line for line in _read_lines(run_dir / "metrics.jsonl")
                   if json.loads(line)["epoch"] <= progress.epochs_done]
        atomic_write(run_dir / "metrics.jsonl", lambda tmp: tmp.write_text("".join(r + "\n" for r in records)))
    return progress


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    try:
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise CnnlabError(f"Cannot write {run_dir / 'metrics.jsonl'}: {exc.strerror or exc}.") from None
