"""Data-parallel training on the CPU with gloo: `torchrun -m cnnlab train` and `cnnlab train
--nproc N` as real processes. Two processes with a global batch B take the same steps as one
process with batch B; gradients are synchronised; a process that dies or hangs ends the job
with a clear error, its last checkpoint intact and resumable."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist
from safetensors.torch import load_file

import cnnlab
from cnnlab.cli import main
from cnnlab.data.batches import BatchLoader, Normalize
from cnnlab.data.split import Split
from cnnlab.errors import CnnlabError
from cnnlab.rundir import RunDir

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
PROBE = str(Path(__file__).with_name("ddp_probe.py"))
# A network without batch norm or dropout, in fp32: then two processes must give one
# process's weights, up to the order of floating-point sums.
EXACT = dict(dataset="fashion-mnist", model="lenet5", precision="fp32", limit_train=2048, epochs=2, batch_size=128,
             translate=1, flip="on", threads=1, progress=False)
RUN_FILES = {"config.yaml", "metrics.jsonl", RunDir.CHECKPOINT, "model.safetensors", "model.json", "summary.json"}


def flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag if value is not False else "--no-" + key.replace("_", "-")] if isinstance(value, bool) else [flag, str(value)]
    return out


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@needs_fmnist
def test_torchrun_two_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    single = cnnlab.train(**EXACT, out=str(tmp_path / "single"))
    out = tmp_path / "ddp"
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "cnnlab", "train",
                             *flags(EXACT), "--out", str(out)], capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone wrote one complete run directory, and alone printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert result.stdout.count("training lenet5") == 1 and "2 processes" in result.stdout
    assert result.stdout.count("test accuracy") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_images"] == json.loads(
        (single / "summary.json").read_text())["train_images"]
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    # the same steps: disjoint shards of the same global batches, gradients averaged
    assert max_weight_difference(single, out) < 1e-4
    # the per-epoch training loss was reduced over both processes' images, so it is one process's too
    losses = [[r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
              for run in (single, out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # the test accuracy, measured on two halves of the test split and summed, is the whole split's
    assert summary["test_accuracy"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["test_accuracy"], abs=2e-4)
    assert cnnlab.Classifier.load(out).class_names[0] == "T-shirt/top"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_fmnist
def test_two_nodes_train_what_one_process_trains(tmp_path: Path) -> None:
    """Two torchrun launchers, as two machines would run them (--nnodes 2, c10d rendezvous at one
    node's address), each with one process, train one run together: rank 0's node writes it, and it
    holds one process's weights, as the single-node runs do."""
    single = cnnlab.train(**EXACT, out=str(tmp_path / "single"))
    out = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "cnnlab-test", "-m", "cnnlab", "train",
                               *flags(EXACT), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    try:
        results = [(node.communicate(timeout=300), node.returncode) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for (_, err), code in results:
        assert code == 0, err[-3000:]
    stdout = "".join(out_text for (out_text, _), _ in results)
    assert stdout.count("training lenet5") == 1 and "2 processes" in stdout  # rank 0 alone prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert max_weight_difference(single, out) < 1e-4


@needs_fmnist
def test_nproc_shortcut_reaches_single_process_accuracy(fmnist_run: Path, tmp_path: Path) -> None:
    """fastnet with batch norm and bf16, the fmnist_run settings in 2 processes: each process
    normalises its own 128 images, so the run differs from one process's, but by little."""
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", "--recipe", "fast",
                             "--limit-train", "8000", "--epochs", "2", "--model-arg", "widths=[16,32,64]",
                             "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single_acc = json.loads((fmnist_run / "summary.json").read_text())["test_accuracy"]
    ddp_acc = json.loads((out / "summary.json").read_text())["test_accuracy"]
    assert abs(ddp_acc - single_acc) <= 0.02, (ddp_acc, single_acc)  # tolerance: 2 points of accuracy
    # the model rank 0 saved scores, in one process, what the two processes measured together
    assert cnnlab.evaluate_run(out, progress=False)["accuracy"] == pytest.approx(ddp_acc, abs=1e-6)


@needs_fmnist
def test_nproc_from_python_leaves_the_environment_as_it_was(tmp_path: Path) -> None:
    """The launcher sets what its processes inherit (threads, its pid) only while they run: a later
    torchrun started from the same Python process would otherwise take a dead launcher's pid."""
    before = dict(os.environ)
    assert main(["train", "--nproc", "2", "--limit-train", "256", "--epochs", "1", "--model-arg", "widths=[4,8,8]",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    changed = {key for key in {*before, *os.environ} if before.get(key) != os.environ.get(key)}
    assert changed <= {"TORCHINDUCTOR_CACHE_DIR"}, changed  # (torch's compiler names its cache on first use)


def test_gradients_are_synchronised_after_one_step(tmp_path: Path) -> None:
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", PROBE, str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    params = [k[len("after."):] for k in r0 if k.startswith("after.")]
    # the ranks started from different random weights; DDP gave both rank 0's
    assert any(not torch.equal(r0[f"own_init.{k}"], r1[f"own_init.{k}"]) for k in params)
    assert all(torch.equal(r0[f"start.{k}"], r1[f"start.{k}"]) for k in params)
    # after one step on different images, identical parameters, and they did change
    assert all(torch.equal(r0[f"after.{k}"], r1[f"after.{k}"]) for k in params)
    assert any(not torch.equal(r0[f"after.{k}"], r0[f"start.{k}"]) for k in params)
    # the two shards are the two halves of the batch one process would have drawn
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (512,), generator=gen))
    whole = BatchLoader(split, 64, Normalize([0.5], [0.25], torch.device("cpu"), True), shuffle=True, translate=1,
                        flip=True, seed=0, drop_last=True)
    images, labels = next(iter(whole))
    assert len(r0["images"]) == len(r1["images"]) == 32
    assert torch.equal(torch.cat([r0["images"], r1["images"]]), images.contiguous())
    assert torch.equal(torch.cat([r0["labels"], r1["labels"]]), labels)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the training process of `rank` among the launcher's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _start_and_wait_for_checkpoint(run: Path, settings: dict, timeout_s: float) -> subprocess.Popen:
    launcher = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", *flags(settings),
                                 "--dist-timeout", str(timeout_s), "--out", str(run)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    return _wait_for_checkpoint(launcher, run)


def _wait_for_checkpoint(launcher: subprocess.Popen, run: Path) -> subprocess.Popen:
    """The launcher, once the run has its first checkpoint (the test fails if it exits first)."""
    deadline = time.monotonic() + 120
    while not (run / RunDir.CHECKPOINT).is_file():
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    return launcher


# lenet5 in fp32 again, long enough to be killed mid-run, a checkpoint every 4 batches
LONG = {**EXACT, "limit_train": 2048, "epochs": 3, "batch_size": 64, "checkpoint_every_steps": 4}


@needs_fmnist
def test_a_killed_process_ends_the_job_and_resume_continues_it(tmp_path: Path) -> None:
    reference = cnnlab.train(**LONG, out=str(tmp_path / "reference"))
    run = tmp_path / "run"
    launcher = _start_and_wait_for_checkpoint(run, LONG, timeout_s=30)
    pid = _rank_pid(launcher, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        _, err = launcher.communicate(timeout=30 + 30)  # the configured timeout, and some
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the job hung after one of its processes was killed")
    assert launcher.returncode != 0
    assert "training process 1 of 2 was killed by SIGKILL" in err
    assert "Traceback" not in err
    assert not (run / "summary.json").exists()
    state = RunDir(run).read_checkpoint()  # intact
    assert state["world"] == 2
    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", "--resume", str(run),
                              "--no-progress"], capture_output=True, text=True, timeout=300, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    # the interrupted and resumed two-process run took one process's steps
    assert max_weight_difference(reference, run) < 1e-4
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@needs_fmnist
def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    """A scheduler's SIGTERM to the launcher reaches every process; they stop together at the next
    step, write one checkpoint, and the job exits 143 with one line; resuming loses nothing."""
    reference = cnnlab.train(**LONG, out=str(tmp_path / "reference"))
    run = tmp_path / "run"
    launcher = _start_and_wait_for_checkpoint(run, LONG, timeout_s=30)
    launcher.send_signal(signal.SIGTERM)
    try:
        out, err = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the job did not stop after SIGTERM")
    assert launcher.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "death signal" not in err
    assert out.count("SIGTERM received") == 1
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and f"continue with `cnnlab train --resume {run}`" in stopped[0], err[-3000:]
    state = RunDir(run).read_checkpoint()
    assert state["world"] == 2 and not (run / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--nproc", "2", "--resume", str(run),
                              "--no-progress"], capture_output=True, text=True, timeout=300, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_weight_difference(reference, run) < 1e-4
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@needs_fmnist
def test_sigkill_of_the_launcher_ends_its_processes_with_a_checkpoint(tmp_path: Path) -> None:
    """`kill -9` of `cnnlab train --nproc 2` cannot be passed on by the launcher; its processes
    still stop (the parent-death signal), at one step with a checkpoint, instead of training on
    orphaned. Long enough (60 epochs) that processes left running would outlive the wait."""
    run = tmp_path / "run"
    launcher = _start_and_wait_for_checkpoint(run, {**LONG, "epochs": 60}, timeout_s=30)
    workers = [_rank_pid(launcher, rank) for rank in (0, 1)]
    assert None not in workers
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        if time.monotonic() > deadline:
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the training processes kept running after their launcher was killed")
        time.sleep(0.1)
    state = RunDir(run).read_checkpoint()  # they stopped at one step and checkpointed it
    assert state["world"] == 2 and not (run / "summary.json").exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@needs_fmnist
def test_torchrun_restarts_resume_from_the_last_checkpoint(tmp_path: Path) -> None:
    """torchrun --max-restarts with --resume auto: when a process is killed, the restarted processes
    continue from the run's last checkpoint (not from scratch) and end with an uninterrupted run's
    weights; each attempt joins through its own store prefix, so the restart connects."""
    reference = cnnlab.train(**LONG, out=str(tmp_path / "reference"))
    run = tmp_path / "run"
    launcher = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "2",
                                 "--monitor-interval", "0.5", "-m", "cnnlab", "train", *flags(LONG),
                                 "--dist-timeout", "30", "--out", str(run), "--resume", "auto"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    _wait_for_checkpoint(launcher, run)
    pid = _rank_pid(launcher, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        out, err = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the restarted job hung")
    assert launcher.returncode == 0, err[-3000:]
    assert f"resuming {run} at epoch" in out
    assert max_weight_difference(reference, run) < 1e-4
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@needs_fmnist
def test_a_hung_process_times_out_with_a_clear_error(tmp_path: Path) -> None:
    """A process alive but silent (stopped): the others give up after --dist-timeout with one
    clear line. (torchrun then allows a stopped process 30 s to act on SIGTERM before it kills
    it; the test kills it as soon as the line is out.)"""
    run = tmp_path / "run"
    launcher = _start_and_wait_for_checkpoint(run, {**LONG, "epochs": 20}, timeout_s=5)
    pid = _rank_pid(launcher, 1)
    assert pid is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in launcher.stderr], daemon=True).start()
    os.kill(pid, signal.SIGSTOP)
    message, deadline = None, time.monotonic() + 5 + 60  # the configured timeout, and some
    try:
        while message is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "stopped answering" in line:
                message = line
    finally:
        os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=120)
    assert message is not None, "the other process waited for ever"
    assert message.startswith("cnnlab: error: Another process of this distributed run stopped or stopped answering")
    assert f"cnnlab train --resume {run}" in message
    assert launcher.returncode != 0
    time.sleep(0.5)  # the reader thread's last lines
    rest = []
    while not lines.empty():
        rest.append(lines.get_nowait())
    assert "Traceback" not in "".join(rest)
    RunDir(run).read_checkpoint()  # intact


def test_distributed_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, fragment in [(["--nproc", "0"], "--nproc must be at least 1"),
                           (["--nproc", "3", "--batch-size", "256"], "must be divisible by --nproc 3"),
                           (["--dist-timeout", "0"], "--dist-timeout must be a positive")]:
        assert main(["train", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(CnnlabError, match="SyncBatchNorm does not run on the CPU"):
        cnnlab.train(dataset="fashion-mnist", sync_bn=True, device="cpu", out=str(tmp_path / "y"), progress=False)
