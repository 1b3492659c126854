"""Crash-safe training: a real `cnnlab train` killed with SIGKILL at a random moment and resumed
ends with the same weights and metrics as an uninterrupted run; divergence and write failures
stop cleanly with the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HAVE_FMNIST, needs_fmnist
from safetensors.torch import load_file

import cnnlab
from cnnlab import files as files_module
from cnnlab.errors import CnnlabError
from cnnlab.rundir import RunDir

# 2 epochs of 32 batches (about 4 s), a checkpoint every 5 batches; one thread, so both runs
# sum in the same order. The airbench levers whose state spans steps (lookahead's average, the
# alternating flips' epoch, the batch-norm biases' own group) are on.
TRAIN_FLAGS = ["--dataset", "fashion-mnist", "--limit-train", "8192", "--epochs", "2", "--batch-size", "256",
               "--model-arg", "widths=[16,32,64]", "--checkpoint-every-steps", "5", "--threads", "1",
               "--tta", "flip", "--translate", "1", "--alternate-flip", "--lookahead-every", "3",
               "--bias-lr-scale", "4", "--lr-end", "0.1", "--no-progress"]


def cnnlab_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")
    run = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = cnnlab_cli("train", *TRAIN_FLAGS, "--out", str(run))
    assert result.returncode == 0, result.stderr
    return run


@needs_fmnist
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_run(uninterrupted: Path, tmp_path: Path) -> None:
    seed = random.randrange(1_000_000)
    delay = random.Random(seed).uniform(0.0, 4.0)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *TRAIN_FLAGS, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / RunDir.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)  # somewhere after the first checkpoint: mid-epoch, between epochs, or while saving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = RunDir(run).read_checkpoint()  # whatever instant it died at, the checkpoint is whole
    print(f"killed after {delay:.2f} s (seed {seed}) at epoch {state['epochs_done'] + 1}, batch {state['step'] + 1}")

    result = cnnlab_cli("train", "--resume", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert_same_run(uninterrupted, run)
    summary = [json.loads((r / "summary.json").read_text()) for r in (uninterrupted, run)]
    assert summary[0]["test_accuracy"] == summary[1]["test_accuracy"]


def assert_same_run(want_dir: Path, got_dir: Path) -> None:
    want, got = load_file(want_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name].float(), got[name].float(), atol=1e-6, rtol=0), name
    for a, b in zip(metrics(want_dir), metrics(got_dir), strict=True):
        for key in ("epoch", "train_loss", "train_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


@needs_fmnist
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_at_the_next_step_and_resume_gives_the_same_run(
        uninterrupted: Path, tmp_path: Path, signum: int) -> None:
    """What a scheduler's preemption does (SIGTERM, then SIGKILL after a grace period) loses nothing
    but the step in progress: the process writes a checkpoint at the next step boundary and exits
    with 128 + the signal's number, saying where it stopped in one line."""
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *TRAIN_FLAGS, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / RunDir.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"{name} received: stopping after this step with a checkpoint" in out
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    where = re.fullmatch(rf"cnnlab: stopped by {name} after (?:batch (\d+) of epoch (\d+)|epoch (\d+)); the "
                         rf"checkpoint in {re.escape(str(run))} is complete: continue with "
                         rf"`cnnlab train --resume {re.escape(str(run))}`\.", last)
    assert where, last
    state = RunDir(run).read_checkpoint()
    batch, epoch, after_epoch = where.groups()
    if batch:  # mid-epoch: the checkpoint holds exactly the batches the message names
        assert (state["epochs_done"], state["step"]) == (int(epoch) - 1, int(batch))
    else:
        assert (state["epochs_done"], state["step"]) == (int(after_epoch), 0)
    assert not (run / "model.safetensors").exists()

    result = cnnlab_cli("train", "--resume", str(run), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert_same_run(uninterrupted, run)


@needs_fmnist
@pytest.mark.parametrize("seconds, saved", [
    (0, [(1, 0), (2, 0)]),  # once per epoch
    (1e-9, [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]),  # always due: after every step (3 per epoch)
])
def test_checkpoint_every_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float,
                                  saved: list[tuple[int, int]]) -> None:
    written = []
    original = RunDir.write_checkpoint

    def noting(self, checkpoint, **kw):
        written.append((checkpoint["epochs_done"], checkpoint["step"]))
        return original(self, checkpoint, **kw)

    monkeypatch.setattr(RunDir, "write_checkpoint", noting)
    cnnlab.train(dataset="fashion-mnist", limit_train=1024, batch_size=256, epochs=2, model="lenet5", threads=1,
                 checkpoint_every_seconds=seconds, progress=False, out=str(tmp_path / "run"))
    assert written == saved  # (epochs done, batches of the next epoch done); an epoch's last step is its own


@needs_fmnist
def test_resume_auto_lets_a_scheduler_rerun_the_same_command(uninterrupted: Path, tmp_path: Path) -> None:
    """`--resume auto --out RUN_DIR`: the first run starts, a preempted one continues, a finished one
    is left alone; always the same command line, as schedulers and torchrun --max-restarts give it."""
    run = tmp_path / "auto"
    command = [sys.executable, "-m", "cnnlab", "train", *TRAIN_FLAGS, "--out", str(run), "--resume", "auto"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / RunDir.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} at epoch" in again.stdout
    assert_same_run(uninterrupted, run)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0 and "nothing to do" in finished.stdout


@needs_fmnist
def test_keep_checkpoints_keeps_the_last_k(tmp_path: Path) -> None:
    run = cnnlab.train(dataset="fashion-mnist", limit_train=1024, batch_size=256, epochs=3, model="lenet5", threads=1,
                       checkpoint_every_steps=1, keep_checkpoints=3, progress=False, out=str(tmp_path / "run"))
    kept = sorted(p.name for p in (run / RunDir.CHECKPOINTS).iterdir())
    # 3 batches per epoch, a checkpoint after each: the last three of the nine
    assert kept == ["checkpoint-e0002-b000001.pt", "checkpoint-e0002-b000002.pt", "checkpoint-e0003-b000000.pt"]
    assert (run / RunDir.CHECKPOINTS / kept[-1]).read_bytes() == (run / RunDir.CHECKPOINT).read_bytes()
    for name in kept:  # each a whole checkpoint, loadable without unpickling code
        state = torch.load(run / RunDir.CHECKPOINTS / name, map_location="cpu", weights_only=True)
        assert f"checkpoint-e{state['epochs_done']:04d}-b{state['step']:06d}.pt" == name
    alone = cnnlab.train(dataset="fashion-mnist", limit_train=1024, batch_size=256, epochs=1, model="lenet5",
                         threads=1, progress=False, out=str(tmp_path / "alone"))
    assert not (alone / RunDir.CHECKPOINTS).exists()  # the default keeps checkpoint.pt alone


@needs_fmnist
def test_resuming_a_finished_run_does_nothing(uninterrupted: Path) -> None:
    before = (uninterrupted / "model.safetensors").read_bytes()
    result = cnnlab_cli("train", "--resume", str(uninterrupted), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "finished training already" in result.stdout and "nothing to do" in result.stdout
    assert (uninterrupted / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["--resume", "{tmp}/nothing-here"], "not a cnnlab run directory"),
    (["--resume", "{run}", "--epochs", "5"], "drop --epochs"),
    (["--resume", "auto", "--dataset", "fashion-mnist"], "--resume auto needs --out RUN_DIR"),
    (["--resume", "auto", "--out", "{run}", "--dataset", "fashion-mnist", "--epochs", "97"],
     "holds a run of another configuration (it differs in --epochs"),
])
def test_resume_usage_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: fashion-mnist\n")
    result = cnnlab_cli("train", *[a.format(tmp=tmp_path, run=run) for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


@needs_fmnist
def test_a_diverging_loss_stops_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "diverged"
    result = cnnlab_cli("train", "--dataset", "fashion-mnist", "--limit-train", "2048", "--epochs", "3",
                        "--model-arg", "widths=[8,16,32]", "--lr", "1e6", "--warmup-epochs", "0",
                        "--label-smoothing", "0", "--checkpoint-every-steps", "1", "--no-progress", "--out", str(run))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in result.stderr
    assert "loss became" in line[0] and "Lower the learning rate" in line[0]
    assert not (run / "model.safetensors").exists()
    if (run / RunDir.CHECKPOINT).exists():  # what was kept holds finite weights only
        state = RunDir(run).read_checkpoint()
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert "last good checkpoint" in line[0]


@needs_fmnist
def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "full"
    saves = {"n": 0}
    real_fsync = os.fsync

    def fsync_until_the_disk_fills(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{RunDir.CHECKPOINT}."):
            saves["n"] += 1
            if saves["n"] > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(files_module.os, "fsync", fsync_until_the_disk_fills)
    with pytest.raises(CnnlabError, match="No space left on device.*intact"):
        cnnlab.train(dataset="fashion-mnist", limit_train=2048, epochs=2, batch_size=256,
                     model_args={"widths": [8, 16, 32]}, checkpoint_every_steps=3, progress=False, out=str(run))
    state = RunDir(run).read_checkpoint()  # the second save: whole, and resumable
    assert (state["epochs_done"], state["step"]) == (0, 6)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_output_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cnnlab_cli("train", "--dataset", "fashion-mnist", "--limit-train", "512", "--epochs", "1",
                        "--no-progress", "--out", str(blocker / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Cannot write" in result.stderr
