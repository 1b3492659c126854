"""The training state in checkpoint.pt: `TrainingState` saves and restores it, one mirroring the
other, so a resumed run (mid-epoch included) continues exactly where the saved one stood.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data.batches import BatchLoader
from ..errors import CnnlabError, Preempted
from ..rundir import RunDir
from . import distributed
from .loop import EpochStats, Totals, TrainingDiverged
from .preempt import StopSignals, stop_message
from .setup import TrainingSetup

# checkpoint.pt, key by key (the layout cnnlab 0.1.0 wrote, still read):
_PROGRESS = ("epochs_done", "step", "train_seconds", "images_seen", "best_val", "loader")  # TrainingState's fields
_OBJECTS = ("model", "optimizer", "scheduler", "ema", "lookahead")  # the setup's objects' state_dicts (None
# where there is none)
_PER_PROCESS = ("torch_rng", "totals")  # one value alone, a list by rank from a distributed run ("world" processes)


@dataclass
class TrainingState:
    """Where training stands, beyond the weights and the optimiser."""
    epochs_done: int = 0
    step: int = 0  # batches done in epoch epochs_done + 1
    train_seconds: float = 0.0
    images_seen: int = 0
    best_val: float = float("nan")
    best_epoch: int = 0  # the epoch that reached best_val (0: none yet)
    loader: dict[str, torch.Tensor] | None = None  # the batch order and random draws of the epoch in progress
    totals: dict[str, Any] | None = None  # this process's running sums of that epoch, when saved mid-epoch
    # when this process last saved (or started): --checkpoint-every-seconds counts from it; not saved
    _saved_at: float = field(default_factory=time.monotonic, init=False, repr=False, compare=False)

    # ------------------------------------------------------------ checkpoint.pt, both ways

    def save(self, run: RunDir, setup: TrainingSetup, loader: BatchLoader, totals: Totals | None = None,
             step: int = 0) -> None:
        """Save the training state; mid-epoch (step > 0) with the epoch's running sums (every
        process's, in a distributed run). Every process calls this; rank 0 writes."""
        if totals is not None and not torch.isfinite(totals.loss):
            raise TrainingDiverged(f"The loss became {totals.loss.item()} in epoch {self.epochs_done + 1}")
        self.step, self._saved_at = step, time.monotonic()
        sums = None if totals is None else {"loss": totals.loss.cpu(), "correct": totals.correct.cpu(),
                                            "seen": totals.seen, "seconds": totals.seconds}
        saved = dataclasses.replace(self, loader=loader.state(), totals=sums)  # the loop keeps its own position
        ctx = setup.ctx
        per_process = distributed.gather_objects(ctx, (torch.get_rng_state(), saved.totals))
        if not ctx.main:
            return
        checkpoint: dict[str, Any] = {key: getattr(saved, key) for key in _PROGRESS}
        checkpoint["best_epoch"] = saved.best_epoch
        checkpoint.update({key: _state_dict(obj) for key, obj in _objects(setup).items()})
        checkpoint.update({key: values[0] if not ctx.active else list(values)
                           for key, values in zip(_PER_PROCESS, zip(*per_process))})
        checkpoint["world"] = ctx.world
        run.write_checkpoint(checkpoint, keep=setup.config.keep_checkpoints)

    @classmethod
    def restore(cls, checkpoint: dict[str, Any], setup: TrainingSetup, run: RunDir) -> "TrainingState":
        """Load a checkpoint into the setup's objects and this process's random state."""
        ctx, written_by = setup.ctx, checkpoint.get("world", 1)
        if checkpoint.get("step") and written_by != ctx.world:
            raise CnnlabError(f"{run / run.CHECKPOINT} was saved mid-epoch by {written_by} process(es); resume it "
                              f"with {written_by} (an end-of-epoch checkpoint resumes with any number).")
        try:
            for key, obj in _objects(setup).items():
                if obj is not None:
                    obj.load_state_dict(checkpoint[key])
            rng, totals = (checkpoint[key] for key in _PER_PROCESS)
            if isinstance(rng, list):  # a distributed run's: one per process
                rng, totals = rng[ctx.rank % len(rng)], totals[ctx.rank % len(totals)]
            torch.set_rng_state(rng)
            return cls(**{key: checkpoint[key] for key in _PROGRESS}, best_epoch=checkpoint.get("best_epoch", 0),
                       totals=totals)
        except (KeyError, TypeError, RuntimeError, ValueError, IndexError) as exc:
            raise CnnlabError(f"{run / run.CHECKPOINT} does not fit this run's model and settings "
                              f"({type(exc).__name__}); start it again instead.") from None

    # ------------------------------------------------------------ the epoch loop's bookkeeping

    def resume_epoch(self, loader: BatchLoader, device: torch.device) -> Totals | None:
        """Put `loader` where the saved state left it; an interrupted epoch's running sums, or None.
        Same order, same random draws, same sums as an uninterrupted epoch."""
        if self.loader is not None:
            loader.resume_at(self.loader, self.step)
        if not self.step:
            return None
        return Totals(self.totals["loss"].to(device), self.totals["correct"].to(device), self.totals["seen"],
                      self.totals["seconds"])

    def end_epoch(self, epoch: int, stats: EpochStats, val_acc: float | None) -> bool:
        """Count the finished epoch; True when its validation accuracy is the best so far."""
        self.epochs_done, self.step, self.loader, self.totals = epoch, 0, None, None
        self.train_seconds += stats.seconds
        self.images_seen += stats.images
        if val_acc is not None and not val_acc <= self.best_val:  # NaN until the first
            self.best_val, self.best_epoch = val_acc, epoch
            return True
        return False

    def mid_epoch_saver(self, run: RunDir, setup: TrainingSetup, loader: BatchLoader,
                        stop: StopSignals) -> Callable[[int, Totals], None]:
        """train_one_epoch's after_step: a checkpoint every config.checkpoint_every_steps batches,
        and on a stop signal, a checkpoint and Preempted (at an epoch's last batch, the epoch's own
        checkpoint comes first: see `stop_after_epoch`)."""
        return functools.partial(self._after_step, run, setup, loader, stop)

    def _after_step(self, run: RunDir, setup: TrainingSetup, loader: BatchLoader, stop: StopSignals, step: int,
                    totals: Totals) -> None:
        every, seconds = setup.config.checkpoint_every_steps, setup.config.checkpoint_every_seconds
        due = bool(seconds) and time.monotonic() - self._saved_at >= seconds
        signum, due = stop.requested(setup.ctx, due)  # every process asks at every step: they agree
        if step + 1 >= len(loader):
            return
        if signum or due or (every and (step + 1) % every == 0):
            self.save(run, setup, loader, totals, step + 1)
        if signum:
            raise Preempted(signum, stop_message(signum, run, self.epochs_done + 1, step + 1))

    def stop_after_epoch(self, run: RunDir, setup: TrainingSetup, stop: StopSignals) -> None:
        """After an epoch's checkpoint: Preempted when a stop signal came (unless it was the last epoch)."""
        signum, _ = stop.requested(setup.ctx)
        if signum and self.epochs_done < setup.config.epochs:
            raise Preempted(signum, stop_message(signum, run, self.epochs_done, 0))


def _objects(setup: TrainingSetup) -> dict[str, Any]:
    return dict(zip(_OBJECTS, (setup.model, setup.optimizer, setup.scheduler, setup.ema, setup.lookahead)))


def _state_dict(obj: Any) -> dict[str, Any] | None:
    return obj.state_dict() if obj is not None else None
