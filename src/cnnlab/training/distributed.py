"""Data-parallel training on PyTorch's own engine: torch.distributed + DistributedDataParallel.

`torchrun --nproc-per-node N -m cnnlab train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in their environment; `cnnlab train --nproc N ...` launches
the same through torchrun's launcher API. Every process builds the same loader and model;
DDP averages the gradients, so N processes with a global batch B take the same steps as one
process with batch B (batch-norm statistics aside: each process normalises its own B/N
images; SyncBatchNorm, with --sync-bn, shares them on GPUs). gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CnnlabError, InvalidSetting

DEFAULT_TIMEOUT_S = 300  # a collective waiting longer than this means a process is gone
# After passing a SIGTERM on to the processes, how long --nproc's launcher lets them write their
# checkpoint before it kills them: the grace period SLURM and Kubernetes give by default
SHUTDOWN_TIMEOUT_S = 30
LAUNCHER_PID = "CNNLAB_LAUNCHER_PID"  # set by --nproc's launcher for the processes it starts


@dataclass(frozen=True)
class Context:
    """This process's place in the job; rank 0 of a world of 1 when not distributed."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def launched() -> bool:
    """True in a process started by torchrun (or `cnnlab train --nproc`) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_s: float) -> tuple[Context, torch.device]:
    """Join the process group torchrun set up (gloo on CPUs, NCCL on GPUs); on a GPU each
    process takes the device of its local rank. Outside torchrun: (SINGLE, device)."""
    if not launched():
        return SINGLE, device
    end_with_launcher()
    if dist.is_initialized():  # e.g. a second train() in one distributed process
        ctx = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    else:
        ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            timeout = timedelta(seconds=timeout_s)
            # torchrun's store outlives a restart (--max-restarts): keys of the attempt before would
            # meet this one's (gloo then fails to connect, or hangs), so each attempt has its own prefix
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"cnnlab/attempt{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout, device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise CnnlabError(f"Cannot join the distributed job ({_first(exc)}); check the torchrun "
                              "rendezvous settings.") from None
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    return ctx, device


def end_with_launcher() -> None:
    """Have this process end when the launcher that started it dies, even by SIGKILL, which it cannot
    pass on: Linux's parent-death signal delivers SIGTERM, so the processes write a checkpoint and
    stop as on preemption, instead of training on, orphaned, in the background."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # from <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and os.getppid() != int(launcher):  # it died before the signal was armed
        raise CnnlabError("The `cnnlab train --nproc` process that started this one has stopped; so does this one.")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context, device: torch.device, sync_bn: bool) -> nn.Module:
    """The model DDP trains (its `.module` is `model`); `model` itself when not distributed."""
    if not ctx.active:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def check_sync_bn(sync_bn: bool, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise InvalidSetting("sync_bn", "needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on the CPU; turn "
                                        "it off (each process then normalises its own share of the batch).")


def sum_across(ctx: Context, *values: float | int | torch.Tensor) -> list[float]:
    """Sum each value over all processes (one all-reduce); the values themselves when alone."""
    if not ctx.active:
        return [float(v) for v in values]
    device = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(device) for v in values])
    dist.all_reduce(t)
    return t.cpu().tolist()


def max_across(ctx: Context, *values: float | int) -> list[float]:
    """The largest of each value over all processes (one all-reduce); the values themselves when alone."""
    if not ctx.active:
        return [float(v) for v in values]
    device = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def gather_objects(ctx: Context, obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (a list of one when alone)."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: Context, obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(ctx: Context, module: nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics), which otherwise
    drift apart, each process having normalised its own images."""
    if ctx.active:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shard_rows(n: int, ctx: Context) -> tuple[int, int]:
    """This process's contiguous [start, end) share of n rows, for evaluation."""
    return n * ctx.rank // ctx.world, n * (ctx.rank + 1) // ctx.world


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another process died or stopped answering."""
    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("gloo", "Gloo", "NCCL", "timed out",
                                                                     "Connection closed", "Connection reset")))


def peer_failure_message(run_dir: Any, exc: BaseException) -> str:
    return (f"Another process of this distributed run stopped or stopped answering ({_first(exc)}); "
            f"the last checkpoint in {run_dir} is intact: continue with `cnnlab train --resume {run_dir}` "
            "and the same torchrun or --nproc settings.")


def launch(nproc: int, argv: Sequence[str], timeout_s: float) -> int:
    """Run `python -m cnnlab train ARGV` in `nproc` local processes through torchrun's launcher;
    a process that fails ends the others and is reported in one line."""
    if nproc < 1:
        raise InvalidSetting("nproc", f"must be at least 1, got {nproc}.")
    environ = dict(os.environ)  # what the processes inherit is set here, and undone after (launch from Python)
    try:
        return _launch(nproc, argv, timeout_s)
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _launch(nproc: int, argv: Sequence[str], timeout_s: float) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun would set one thread per process; share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the processes end with this one (end_with_launcher)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its reports are replaced by ours (some set their own level)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_timeout=int(timeout_s),
                          max_restarts=0, monitor_interval=0.5, start_method="spawn",
                          shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        elastic_launch(config, sys.executable)("-m", "cnnlab", "train", *argv)
    except SignalException as exc:
        # SIGTERM/SIGINT: torchrun's agent passed it on to the processes, which wrote a checkpoint
        # at their next step and said so (preempt.py); end as the signal would
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode == 2:  # a user's mistake: the process has said what it was
            return 2
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        print(f"cnnlab: error: training process {rank} of {nproc} {how}; the others were stopped. "
              "Its own error, if it printed one, is above; a run directory's last checkpoint is intact "
              "and `cnnlab train --nproc N --resume RUN_DIR` continues it.", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
