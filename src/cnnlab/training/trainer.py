"""`train(config) -> run_dir`: the epoch loop, between the training setup (setup.py) and the
run directory it writes: config.yaml, metrics.jsonl, checkpoint.pt (state.py) each epoch, then
model.safetensors + model.json and summary.json.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..card import ModelCard
from ..data.batches import BatchLoader
from ..data.memory import own_bundle, save_split
from ..data.split import DatasetBundle
from ..devices import resolve_device
from ..errors import CnnlabError
from ..models.registry import check_model_name, count_parameters, recorded_name
from ..models.source import is_import_path, source_of
from ..rundir import RunDir
from . import distributed
from .config import MACHINE_SETTINGS, TrainConfig, load_yaml, make_config, recipe_note
from .loop import EpochStats, TrainingDiverged, predict_logits, train_one_epoch
from .preempt import StopSignals
from .recipes import recipe_for
from .setup import TrainingSetup, build_setup
from .state import TrainingState
from .tblog import TensorBoardLog, require_tensorboard


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_run_dir(config: TrainConfig) -> Path:
    dataset = "folder-" + Path(config.dataset[7:]).name if config.dataset.startswith("folder:") else config.dataset
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = config.model.rpartition(":")[2] if is_import_path(config.model) else config.model  # Net, not its path
    base = Path("runs") / f"{_slug(dataset)}-{_slug(model)}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


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


def train(config: TrainConfig | None = None, /, *, resume: str | Path | None = None, overwrite: bool = False,
          data: Any = None, test_data: Any = None, val_data: Any = None, class_names: list[str] | None = None,
          **overrides: Any) -> Path:
    """Train a model; returns the run directory. Other keyword arguments are TrainConfig fields.

    model: a registered name, tv:NAME, an import path (path/to/file.py:Name, package.module:Name),
    or your own model class, factory or nn.Module instance (later commands import its class
    again, so it must live in a .py file).

    data: your own training images instead of config.dataset: (images, labels) arrays (numpy or
    torch; N,H,W[,C] or N,C,H,W; uint8 0-255 or float 0-1) or a torch Dataset of (image, label)
    pairs. test_data and val_data the same (by default, stratified hold-outs of data);
    class_names names the labels 0..K-1.

    resume: a run directory to continue from its last checkpoint (mid-epoch included) with its
    own config.yaml; the result equals an uninterrupted run's on the same machine.
    overwrite: replace what is in config.out; a run there is refused otherwise.

    Started by torchrun (or `cnnlab train --nproc N`), each process trains its shard of every
    batch with DistributedDataParallel and rank 0 alone writes the run directory."""
    checkpoint, instance, given_config = None, None, config is not None
    if "model" in overrides and not isinstance(overrides["model"], str):
        given = overrides["model"]
        overrides["model"] = source_of(given).spec  # what later processes import
        instance = given if isinstance(given, nn.Module) else None
    if resume is not None:
        config, checkpoint = _resume_state(Path(resume), overrides)
        if checkpoint is None:
            _log(f"{resume} has finished training already (summary.json is there); nothing to do.")
            return Path(resume)
    else:
        config = make_config(**overrides) if config is None else _with_overrides(config, overrides)
        if config.out and not overwrite:
            problem = RunDir(config.out).occupied()
            if problem:
                raise CnnlabError(problem)
    bundle = None
    if data is not None:
        bundle = own_bundle(data, test_data, val_data, class_names, val_split=config.val_split, seed=config.seed,
                            progress=config.progress)
        named = resume is not None or given_config or {"recipe", "model"} & set(overrides)
        suited = recipe_for((bundle.in_channels, max(bundle.image_size)))
        if not named and suited != config.recipe:
            config = make_config(**overrides, recipe=suited)
        config = dataclasses.replace(config, dataset=bundle.name)
    check_model_name(config.model)  # before joining other processes and minutes of data loading
    recorded = recorded_name(config.model)  # a file path made absolute; a user-registered model by its path
    if recorded != config.model:
        config = dataclasses.replace(config, model=recorded)
    if config.tensorboard:
        require_tensorboard()
    device = resolve_device(config.device)
    distributed.check_sync_bn(config.sync_bn, device)
    ctx, device = distributed.setup(device, config.dist_timeout)
    run_dir: Path | None = Path(resume) if resume is not None else None
    try:
        return _train(config, checkpoint, run_dir, ctx, device, bundle=bundle, model=instance, overwrite=overwrite)
    except CnnlabError:
        raise
    except Exception as exc:
        if ctx.active and distributed.is_peer_failure(exc):
            raise CnnlabError(distributed.peer_failure_message(run_dir or config.out or "the run directory", exc)) from None
        raise
    finally:
        distributed.teardown()


def _with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A TrainConfig with keyword overrides. The config's settings that differ from its recipe's
    count as given, so that the recipe's rules (another model's own defaults, --epochs meaning
    exactly that many) apply to the overrides as they do to flags."""
    if not overrides:
        return make_config(**config.to_dict())
    plain = make_config(recipe=config.recipe).to_dict()
    given = {k: v for k, v in config.to_dict().items() if k == "recipe" or v != plain[k]}
    return make_config(**{**given, **overrides})


def _train(config: TrainConfig, checkpoint: dict[str, Any] | None, run_dir: Path | None,
           ctx: distributed.Context, device: torch.device, *, bundle: DatasetBundle | None = None,
           model: nn.Module | None = None, overwrite: bool = False) -> Path:
    say = _log if ctx.main else _quiet
    setup = build_setup(config, ctx, device, bundle=bundle, model=model)
    if checkpoint is not None:
        run = RunDir(run_dir)
        state = TrainingState.restore(checkpoint, setup, run)
        if ctx.main:  # metrics.jsonl keeps only the epochs the checkpoint covers
            run.keep_metrics(state.epochs_done)
        say(f"resuming {run_dir} at epoch {state.epochs_done + 1}, batch {state.step + 1}")
    else:
        run, state = _start_run(setup, overwrite), TrainingState()
    if bundle is not None and ctx.main and not (run / RunDir.TEST_DATA).exists():
        # data given from Python cannot be loaded again by name: evaluate and report score this copy
        save_split(setup.data.bundle.test, setup.data.bundle.class_names, run / RunDir.TEST_DATA)
    say(_describe(setup, run))
    for line in (setup.data.bundle.origin_line, setup.init_note, setup.data.schedule, recipe_note(setup.config),
                 _selection_note(setup)):
        if line:
            say(line)
    log = _EpochLog(run, setup, say)
    try:
        with StopSignals() as stop:  # SIGTERM/SIGINT: a checkpoint at the next step, then Preempted
            _train_epochs(setup, state, run, log, stop)
    except TrainingDiverged as exc:
        kept = (f"the last good checkpoint (it resumes at epoch {state.epochs_done + 1}, batch "
                f"{state.step + 1}) is kept in {run}" if run.has_checkpoint() else "no checkpoint had been written yet")
        raise TrainingDiverged(f"{exc}; training stopped and {kept}. Lower the learning rate and start "
                               "again.") from None
    finally:
        log.close()
    return _finish(setup, state, run, say)


def _train_epochs(setup: TrainingSetup, state: TrainingState, run: RunDir, log: _EpochLog, stop: StopSignals) -> None:
    """The epoch loop: train, combine the processes' figures, validate, record, checkpoint."""
    config, data = setup.config, setup.data
    select, separate = _selects_best(setup), _separate_val(setup)
    for epoch in range(state.epochs_done + 1, config.epochs + 1):
        if config.early_stop and separate and state.best_epoch and epoch - 1 - state.best_epoch >= config.early_stop:
            break  # a resumed run that had stopped early before its summary was written
        loader = data.loader_for(epoch)
        totals = state.resume_epoch(loader, setup.device)  # None unless resuming mid-epoch
        stats = train_one_epoch(setup.net, loader, setup.optimizer, setup.scheduler, setup.loss_fn,
                                bf16=setup.bf16, epoch=epoch, ema=setup.ema, lookahead=setup.lookahead, progress=setup.progress,
                                start=state.step, totals=totals, after_step=state.mid_epoch_saver(run, setup, loader, stop))
        stats = _over_all_processes(setup, stats)
        val_acc, val_loss = _validate(setup, data.val_loader, bf16=setup.bf16) if data.val_loader else (None, None)
        if state.end_epoch(epoch, stats, val_acc) and select and setup.ctx.main:
            run.write_best(setup.final.state_dict())  # before the checkpoint that counts on it
        record = {"epoch": epoch, "elapsed_seconds": round(state.train_seconds, 3), "train_loss": stats.loss,
                  "train_accuracy": stats.accuracy, "val_accuracy": val_acc, "val_loss": val_loss,
                  "lr": setup.optimizer.param_groups[0]["lr"], "images_per_second": round(stats.images_per_second, 1)}
        if config.eval_test:
            record["test_accuracy"] = _accuracy(setup, data.test_loader, bf16=setup.bf16, tta=config.tta,
                                                flip=data.flip)
        log.record(record)  # before the checkpoint: a resumed run keeps the records its checkpoint covers
        state.save(run, setup, loader)
        log.line(epoch, stats, val_acc, state.train_seconds)
        state.stop_after_epoch(run, setup, stop)
        if config.early_stop and separate and epoch - state.best_epoch >= config.early_stop:
            log.say(f"stopping early: no better validation accuracy for {config.early_stop} epochs "
                    f"(best {state.best_val:.4f} after epoch {state.best_epoch})")
            break


def _separate_val(setup: TrainingSetup) -> bool:
    """A validation split that is not also the test split: what keep-best and early stopping
    choose on (choosing on the test images would flatter the test accuracy)."""
    bundle = setup.data.bundle
    return bundle.val is not None and bundle.val is not bundle.test


def _selects_best(setup: TrainingSetup) -> bool:
    return setup.config.keep == "best" and _separate_val(setup)


def _selection_note(setup: TrainingSetup) -> str | None:
    config, bundle = setup.config, setup.data.bundle
    if _separate_val(setup):
        return None
    off = [what for what, on in (("keeping the best epoch", config.keep == "best" and bundle.val is not None),
                                 ("early stopping", bool(config.early_stop))) if on]
    if not off:
        return None
    why = "the validation split is also the test split" if bundle.val is not None else "there is no validation split"
    return f"{' and '.join(off)} off: {why}"


def _over_all_processes(setup: TrainingSetup, stats: EpochStats) -> EpochStats:
    """The epoch's loss and accuracy over all processes' images, and one set of batch-norm
    statistics (rank 0's); `stats` itself when alone."""
    ctx = setup.ctx
    if not ctx.active:
        return stats
    loss_sum, correct, seen = distributed.sum_across(ctx, stats.loss * stats.images, stats.accuracy * stats.images,
                                                     stats.images)
    stats.loss, stats.accuracy, stats.images = loss_sum / seen, correct / seen, int(seen)
    distributed.sync_buffers(ctx, setup.model)
    return stats


def _validate(setup: TrainingSetup, loader: BatchLoader, **kw: Any) -> tuple[float, float]:
    """The final weights' accuracy and mean cross-entropy over the whole split, all processes' shares summed."""
    correct, loss, total = 0, 0.0, 0
    if len(loader.split):  # a process's share can be empty when a split has fewer images than processes
        logits, labels = predict_logits(setup.final, loader, **kw)
        correct, total = (logits.argmax(1) == labels).sum(), len(labels)
        loss = F.cross_entropy(logits, labels, reduction="sum")
    correct, loss, total = distributed.sum_across(setup.ctx, correct, loss, total)
    return (correct / total, loss / total) if total else (float("nan"), float("nan"))


def _accuracy(setup: TrainingSetup, loader: BatchLoader, **kw: Any) -> float:
    """The final weights' accuracy over the whole split (see _validate)."""
    return _validate(setup, loader, **kw)[0]


class _EpochLog:
    """Each epoch's record in metrics.jsonl and TensorBoard (rank 0 writes), and its line on stdout."""

    def __init__(self, run: RunDir, setup: TrainingSetup, say: Callable[[str], None]):
        self.run, self.main, self.epochs, self.say = run, setup.ctx.main, setup.config.epochs, say
        self.tensorboard = TensorBoardLog(run / RunDir.TENSORBOARD) if setup.config.tensorboard and self.main else None

    def record(self, record: dict[str, Any]) -> None:
        if self.main:
            self.run.append_metrics(record)
            if self.tensorboard is not None:
                self.tensorboard.log_epoch(record)

    def line(self, epoch: int, stats: EpochStats, val_acc: float | None, train_seconds: float) -> None:
        val_text = f", val acc {val_acc:.4f}" if val_acc is not None else ""
        self.say(f"epoch {epoch}/{self.epochs}: loss {stats.loss:.4f}, train acc {stats.accuracy:.4f}{val_text}, "
                 f"{stats.images_per_second:.0f} img/s, {train_seconds:.1f}s")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _describe(setup: TrainingSetup, run: RunDir) -> str:
    """The run's first line: model, data, device and where it writes."""
    config, bundle, ctx = setup.config, setup.data.bundle, setup.ctx
    processes = f", {ctx.world} processes" if ctx.active else ""
    return (f"training {config.model} ({count_parameters(setup.model):,} parameters) on {bundle.name}: "
            f"{len(bundle.train):,} train / {len(bundle.val) if bundle.val else 0:,} val / {len(bundle.test):,} "
            f"test images, {setup.device.type}{' bf16' if setup.bf16 else ''}{processes} -> {run}")


def _finish(setup: TrainingSetup, state: TrainingState, run: RunDir, say: Callable[[str], None]) -> Path:
    """Test the final weights; rank 0 writes them with their model card, and summary.json."""
    config, data, ctx = setup.config, setup.data, setup.ctx
    kept_epoch = state.epochs_done
    if _selects_best(setup) and 0 < state.best_epoch < state.epochs_done:
        # rank 0 wrote it; sent to the others, whose run directory need not be the same disk
        best = distributed.broadcast_object(ctx, run.read_best() if ctx.main else None)
        if best is not None:
            setup.final.load_state_dict(best)
            kept_epoch = state.best_epoch
            say(f"keeping the weights of epoch {kept_epoch}, the best on the validation split "
                f"({state.best_val:.4f})")
    # fp32 here, as evaluate, predict and exported models run: the figures must agree
    test_acc = _accuracy(setup, data.test_loader, bf16=False, tta=config.tta, flip=data.flip)
    peak_rss = distributed.gather_objects(ctx, peak_rss_mib())
    if not ctx.main:
        return run.path
    bundle = data.bundle
    run.write_model(setup.final.state_dict(), ModelCard(
        architecture=config.model, model_args=config.model_args, class_names=bundle.class_names,
        in_channels=bundle.in_channels, image_size=bundle.image_size, mean=data.mean, std=data.std,
        tta=config.tta, tta_flip=data.flip, dataset=bundle.name, recipe=config.recipe,
        cnnlab_version=__version__, source_sha256=setup.source_sha256))
    run.write_summary({
        "test_accuracy": test_acc, "best_val_accuracy": None if math.isnan(state.best_val) else state.best_val,
        "train_seconds": round(state.train_seconds, 3), "epochs": state.epochs_done, "kept_epoch": kept_epoch,
        "images_per_second": round(state.images_seen / max(state.train_seconds, 1e-9), 1),
        "params": count_parameters(setup.model), "dataset": bundle.name, "model": config.model,
        "device": setup.device.type, "bf16": setup.bf16, "train_images": len(bundle.train), "processes": ctx.world,
        "peak_rss_mib": peak_rss,  # one figure per process
        "skipped_files": len(bundle.skipped or []),
        "finished": datetime.now().isoformat(timespec="seconds")})
    run.remove_best()  # after summary.json: a resume before it still finds the best weights
    say(f"test accuracy {test_acc:.4f} after {state.train_seconds:.1f}s of training; run directory {run}")
    return run.path


def _start_run(setup: TrainingSetup, overwrite: bool = False) -> RunDir:
    """A new run directory, named by rank 0; every process stops if it cannot be written."""
    config, ctx = setup.config, setup.ctx
    run_dir = distributed.broadcast_object(ctx, Path(config.out) if config.out else default_run_dir(config))
    problem = _start_run_dir(run_dir, config, setup.data.bundle, overwrite) if ctx.main else None
    problem = distributed.broadcast_object(ctx, problem)  # every process stops, not only rank 0
    if problem:
        raise CnnlabError(problem)
    return RunDir(run_dir)


def _start_run_dir(run_dir: Path, config: TrainConfig, bundle: DatasetBundle, overwrite: bool) -> str | None:
    """Create a new run directory with its config.yaml; a problem is returned as one sentence."""
    run = RunDir(run_dir)
    problem = run.occupied()
    if problem and not overwrite:
        return problem
    try:
        if problem:
            run.clear()
        run_dir.mkdir(parents=True, exist_ok=True)
        run.write_config(config.to_dict())
        run.start_metrics()
        run.write_skipped(bundle.skipped or [])
    except OSError as exc:
        return f"Cannot write {run_dir}: {exc.strerror or exc}."
    except CnnlabError as exc:
        return str(exc)
    return None


def auto_resume(config: TrainConfig) -> tuple[Path | None, bool]:
    """What `--resume auto` does with config.out: (the run directory to resume, None) when it holds
    a checkpoint (or a finished run) of this very configuration, settings of the machine aside;
    (None, overwrite) to start a new run there (overwrite: a run of this configuration that stopped
    before its first checkpoint). A run of another configuration is refused in one sentence. Every
    process of a distributed run decides alike: the files only change once all have joined."""
    if not config.out:
        raise CnnlabError("--resume auto needs --out RUN_DIR: the run directory to continue, or to start in.")
    run = RunDir(config.out)
    if not run.has_config():
        return None, False
    recorded = make_config(**load_yaml(run / run.CONFIG)).to_dict()
    wanted = dataclasses.replace(config, model=recorded_name(config.model)).to_dict()
    differ = [key for key in wanted if key not in (*MACHINE_SETTINGS, "out") and wanted[key] != recorded.get(key)]
    if differ:
        flags = ", ".join("--" + key.replace("_", "-") for key in differ[:4]) + (", ..." if len(differ) > 4 else "")
        raise CnnlabError(f"{config.out} holds a run of another configuration (it differs in {flags}); "
                          f"continue it with `cnnlab train --resume {config.out}`, or choose another --out.")
    if run.is_finished() or run.has_checkpoint():
        return run.path, False
    return None, True


def _resume_state(run_dir: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and its last checkpoint (None when the run has finished)."""
    run = RunDir(run_dir)
    if not run.has_config():
        raise CnnlabError(f"{run_dir} is not a cnnlab run directory (no {run.CONFIG}); nothing to resume.")
    config = make_config(**{**load_yaml(run / run.CONFIG), **overrides})
    if run.is_finished():
        return config, None
    if not run.has_checkpoint():
        raise CnnlabError(f"{run_dir} has no {run.CHECKPOINT} yet (it stopped before its first checkpoint); "
                          "start it again instead.")
    return config, run.read_checkpoint()
