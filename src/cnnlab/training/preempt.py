"""Preemption: SIGTERM, what SLURM, Kubernetes and spot instances send before they kill a job, and
SIGINT (Ctrl-C) stop training at the next step boundary with a checkpoint, so that `cnnlab train
--resume RUN_DIR` (the scheduler's restart) loses nothing but the step in progress.

The handler only notes the signal; the training loop asks `StopSignals.requested` after each
optimiser step. In a distributed run every process asks with one all-reduce, so all of them stop
at the same step (and write one checkpoint together) whichever process the signal reached.
A second Ctrl-C stops at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from . import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_SECONDS = 1.0  # a second SIGINT sooner than this after the first is the same Ctrl-C


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT are noted instead of ending the process."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received; 0 for none
        self._since = 0.0  # when it came (time.monotonic)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            # Ctrl-C twice: stop now. Within a second it is the same Ctrl-C passed on again (a
            # terminal signals a whole process group, and --nproc's launcher forwards it too)
            if time.monotonic() - self._since > REPEAT_SECONDS:
                raise KeyboardInterrupt
        if not self.signum:
            self.signum, self._since = signum, time.monotonic()
            if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per process
                print(f"cnnlab: {signal.Signals(signum).name} received: stopping after this step with a checkpoint"
                      + (" (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""), flush=True)

    def requested(self, ctx: distributed.Context, due: bool = False) -> tuple[int, bool]:
        """The signal any process of the run received (0 for none), and whether any process found a
        timed checkpoint `due`; in a distributed run every process must call this at the same step,
        and all get the same answer (one all-reduce)."""
        signum, any_due = distributed.max_across(ctx, self.signum, due)
        return int(signum), bool(any_due)


def stop_message(signum: int, run: object, epoch: int, step: int) -> str:
    """The one line a stopped run ends with; `step` is the number of batches of `epoch` done."""
    where = f"after batch {step} of epoch {epoch}" if step else f"after epoch {epoch}"
    return (f"stopped by {signal.Signals(signum).name} {where}; the checkpoint in {run} is complete: "
            f"continue with `cnnlab train --resume {run}`.")
