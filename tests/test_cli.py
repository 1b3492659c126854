"""The `cnnlab` command in real subprocesses: training on a folder of real images, exit codes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnnlab.data.builtin import DEBIAN_FASHION_MNIST
from cnnlab.data.load import load_dataset

needs_fmnist = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")


def cnnlab(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"CNNLAB_CACHE": str(tmp_path_factory.mktemp("cache")), "CNNLAB_DATA": ""}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST test images saved as PNG and JPEG in class folders, train/ and test/ splits,
    with an empty class folder in the middle."""
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    root = tmp_path_factory.mktemp("photos")
    test = load_dataset("fashion-mnist", val_split=0.0).test
    keep = {1: "trouser", 8: "bag", 7: "sneaker"}
    counts: dict[int, int] = {}
    for image, label in zip(test.images, test.labels.tolist()):
        if label not in keep or counts.get(label, 0) >= 240:
            continue
        n = counts[label] = counts.get(label, 0) + 1
        split = "test" if n % 4 == 0 else "train"
        folder = root / split / keep[label]
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(image[0].numpy())
        if n % 2:
            pil.save(folder / f"{n:04d}.png")
        else:
            pil.convert("RGB").save(folder / f"{n:04d}.jpg", quality=90)
    (root / "train" / "coat").mkdir()  # empty: must not shift 'sneaker' or 'trouser'
    return root


@needs_fmnist
def test_train_and_evaluate_a_folder_dataset(photo_folder: Path, cache: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cnnlab("train", "--dataset", f"folder:{photo_folder}", "--epochs", "6", "--batch-size", "64",
                    "--lr", "0.1", "--out", str(run), "--no-progress", env=cache)
    assert result.returncode == 0, result.stderr
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == ["bag", "coat", "sneaker", "trouser"]
    assert meta["in_channels"] == 3 and meta["image_size"] == [28, 28]  # JPEGs are RGB; median side 28
    result = cnnlab("evaluate", str(run), "--no-progress", env=cache)
    assert result.returncode == 0, result.stderr
    for name in ("bag", "sneaker", "trouser", "precision", "confusion matrix"):
        assert name in result.stdout
    report = json.loads((run / "eval.json").read_text())
    assert report["images"] == 180 and report["accuracy"] > 0.8  # three easy classes; chance is 1/3
    assert [row["support"] for row in report["per_class"]] == [60, 0, 60, 60]


@needs_fmnist
def test_evaluate_accuracy_gate(cache: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tmp_path / "small.yaml"
    config.write_text("limit_train: 1000\nepochs: 1\nbatch_size: 500\nmodel: simple\n")
    result = cnnlab("train", "--config", str(config), "--batch-size", "100", "--out", str(run), "--no-progress",
                    env=cache)
    assert result.returncode == 0, result.stderr
    import yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["batch_size"] == 100 and saved["limit_train"] == 1000 and saved["model"] == "simple"
    failed = cnnlab("evaluate", str(run), "--min-accuracy", "0.999", "--no-progress", env=cache)
    assert failed.returncode == 3 and "below the required" in failed.stderr
    passed = cnnlab("evaluate", str(run), "--min-accuracy", "0.2", "--no-progress", env=cache)
    assert passed.returncode == 0 and "passed" in passed.stdout


def test_lists() -> None:
    models = cnnlab("models")
    assert models.returncode == 0
    for name in ("fastnet", "simple", "lenet5", "vgg11-small", "resnet18-cifar", "tv:"):
        assert name in models.stdout
    datasets = cnnlab("datasets", env={"CNNLAB_CACHE": "/nonexistent-cnnlab-cache"})
    assert datasets.returncode == 0
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder:PATH"):
        assert name in datasets.stdout
    assert "missing" in datasets.stdout  # cifar100 is not on this machine


@pytest.mark.parametrize("args, fragments", [
    (["train", "--epochs", "-1"], ["--epochs"]),
    (["train", "--epochs", "two"], ["--epochs", "two"]),
    (["train", "--no-such-flag"], ["--no-such-flag"]),
    (["train", "--model", "alexnet-9000"], ["alexnet-9000"]),
    (["train", "--dataset", "imagenet-99"], ["imagenet-99"]),
    (["train", "--dataset", "folder:/no/such/folder"], ["/no/such/folder"]),
    (["train", "--model", "tv:nonexistent_net"], ["nonexistent_net"]),
    (["train", "--val-split", "1.5"], ["--val-split"]),
    (["train", "--device", "tpu"], ["--device"]),
    (["train", "--model-arg", "oops"], ["KEY=VALUE"]),
    (["train", "--dataset", "cifar100", "--no-download"], ["cifar-100-python", "train", "meta"]),
    (["evaluate", "/no/such/run"], ["/no/such/run"]),
    (["evaluate"], ["RUN_DIR"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_usage_errors_are_one_line(args: list[str], fragments: list[str], cache: dict) -> None:
    assert_usage_error(cnnlab(*args, env=cache), *fragments)


@pytest.mark.parametrize("text, fragment", [
    ("epochs: [1, 2\n", "not valid YAML"),
    ("epochz: 3\n", "epochz"),
    ("epochs: many\n", "epochs"),
    ("- a list\n", "mapping"),
])
def test_bad_config_files(text: str, fragment: str, tmp_path: Path, cache: dict) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert_usage_error(cnnlab("train", "--config", str(config), env=cache), fragment)


def test_missing_config_file(cache: dict) -> None:
    assert_usage_error(cnnlab("train", "--config", "/no/such.yaml", env=cache), "/no/such.yaml")


def test_evaluate_a_folder_that_is_not_a_run(tmp_path: Path, cache: dict) -> None:
    assert_usage_error(cnnlab("evaluate", str(tmp_path), env=cache), "model.json")
    (tmp_path / "model.json").write_text("{not json")
    assert_usage_error(cnnlab("evaluate", str(tmp_path), env=cache), "not valid JSON")


def test_recipe_settings_reach_training_through_the_cli(tmp_path: Path, cache: dict) -> None:
    """`--recipe fast` must build the recipe's architecture (its 16-wide first layer), not the defaults."""
    from cnnlab.training.recipes import get_recipe

    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("limit_train: 300\nepochs: 1\n")
    result = cnnlab("train", "--recipe", "fast", "--config", str(config), "--out", str(run), "--no-progress",
                    env=cache)
    assert result.returncode == 0, result.stderr
    meta = json.loads((run / "model.json").read_text())
    assert meta["model_args"] == get_recipe("fast").settings["model_args"] and meta["recipe"] == "fast"
    assert meta["model_args"]["stem"] == 16
    result = cnnlab("train", "--recipe", "fast", "--config", str(config), "--model-arg", "widths=[8,16]",
                    "--out", str(tmp_path / "run2"), "--no-progress", env=cache)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run2" / "model.json").read_text())["model_args"] == {"widths": [8, 16]}



@pytest.mark.parametrize("command", ["train", "lr-find"])
def test_help_shows_the_defaults_a_run_gets(command: str) -> None:
    """`--help` states what an unset flag gives: the default recipe's setting (and says so) or TrainConfig's."""
    import argparse
    import dataclasses

    from cnnlab.cli import build_parser
    from cnnlab.training.config import TrainConfig, default_settings, make_config

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    helps = {a.dest: a.help for a in sub._actions}
    in_words = {f.name for f in dataclasses.fields(TrainConfig) if "(default:" in f.metadata["help"]}
    run = make_config()
    for name, (value, recipe) in default_settings().items():
        if name in ("model_args", "split_folders") or name in in_words:
            continue
        assert value == getattr(run, name)
        assert helps[name].endswith(f"(default: {value}, from recipe {recipe})" if recipe else f"(default: {value})")
    assert helps["translate"].endswith(f"(default: {run.translate}, from recipe {run.recipe})")
    assert helps["momentum"].endswith(f"(default: {run.momentum})")
