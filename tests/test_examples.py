"""The cluster examples, checked as far as one machine allows: the SLURM script is valid bash whose
torchrun and cnnlab flags parse with torchrun's and cnnlab's own parsers; the Kubernetes manifest
parses, and each pod runs a cnnlab command that parses, resumes automatically and writes to the
shared volume it mounts."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml
from torch.distributed.run import get_args_parser

from cnnlab.cli import _config_from_flags, build_parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SLURM = EXAMPLES / "slurm" / "train.sbatch"
PYTORCHJOB = EXAMPLES / "kubernetes" / "pytorchjob.yaml"


def check_train_args(args: list[str]) -> None:
    """`cnnlab train ARGS` parses, builds a valid configuration, and is a command a scheduler can
    run again and again: --resume auto with an --out."""
    ns = build_parser().parse_args(["train", *args])
    assert ns.resume == "auto" and ns.out
    config = _config_from_flags(ns)
    assert config.out == ns.out and config.checkpoint_every_seconds > 0


def test_the_slurm_script_is_valid_and_its_commands_parse() -> None:
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True).returncode == 0
    text = SLURM.read_text()
    assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=TERM@\d+", text)
    command = re.search(r"^srun (torchrun .*?)(?<!\\)$", text, re.S | re.M).group(1).replace("\\\n", " ")
    values = {"$SLURM_NNODES": "2", "$NPROC_PER_NODE": "1", "$HEAD": "node1", "$SLURM_JOB_ID": "42",
              "$DATA": "/shared/datasets/cifar10", "$OUT": "/shared/runs/cifar"}
    for name, value in values.items():
        command = command.replace(name, value)
    words = shlex.split(command)
    torchrun = get_args_parser().parse_args(words[1:])
    assert torchrun.nnodes == "2" and torchrun.rdzv_backend == "c10d" and torchrun.max_restarts > 0
    assert torchrun.module and torchrun.training_script == "cnnlab" and torchrun.training_script_args[0] == "train"
    check_train_args(torchrun.training_script_args[1:])


def test_the_kubernetes_manifest_runs_a_resumable_cnnlab_in_every_pod() -> None:
    job = yaml.safe_load(PYTORCHJOB.read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"
        pod = spec["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 30  # time to write the checkpoint after SIGTERM
        (container,) = pod["containers"]
        assert container["command"] == ["python", "-m", "cnnlab", "train"]
        check_train_args(container["args"])
        out = container["args"][container["args"].index("--out") + 1]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shared = [path for path in mounts if out.startswith(path.rstrip("/") + "/")]
        assert shared, f"--out {out} is on no mounted volume"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[shared[0]])
        assert "persistentVolumeClaim" in volume
