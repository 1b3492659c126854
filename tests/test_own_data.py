"""A user's own data: arrays and torch Datasets from Python, small folders with the default
recipe, split folders as tools name them, keeping the best epoch, starting from trained
weights, and never overwriting a run unasked. Through the CLI in fresh processes where a user
would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fmnist
from PIL import Image
from usage import usage_error

import cnnlab
import cnnlab.cli
from cnnlab.data.load import load_dataset

pytestmark = [needs_fmnist, pytest.mark.usefixtures("use_cache_env")]

EASY = ["Trouser", "Bag", "Sneaker", "Sandal"]  # four Fashion-MNIST classes a small model tells apart
OTHERS = ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt", "Ankle boot"]


def cnnlab_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", val_split=0, progress=False)


def write_images(folder: Path, split, class_names: list[str], classes: list[str], per_class: int,
                 start: int = 0) -> None:
    """per_class images of each of `classes` from `split`, as PNG files in folder/CLASS/."""
    for name in classes:
        index = torch.nonzero(split.labels == class_names.index(name)).flatten()[start:start + per_class]
        (folder / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        for i in index.tolist():
            Image.fromarray(split.images[i, 0].numpy(), mode="L").save(folder / name.replace("/", "-") / f"{i}.png")


@pytest.fixture(scope="module")
def small_folder(fmnist, tmp_path_factory) -> Path:
    """600 training images of 4 easy classes, tested on all 4,000 test images of those classes."""
    root = tmp_path_factory.mktemp("small") / "clothes"
    write_images(root / "train", fmnist.train, fmnist.class_names, EASY, 150)
    write_images(root / "test", fmnist.test, fmnist.class_names, EASY, 1000)
    return root


def test_the_default_recipe_fits_a_600_image_folder(small_folder, tmp_path, cache_env):
    """No flags: the recipe's 4 epochs would be 8 steps at batch 256 and end near chance."""
    result = cnnlab_cli("train", "--dataset", f"folder:{small_folder}", "--out", str(tmp_path / "run"),
                        "--no-progress", env=cache_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training fastnet")
    assert f"folder:{small_folder}: train <- train/ (600 images)" in result.stdout
    schedule = next(line for line in lines if line.startswith("schedule:"))
    assert "batch 32 for 600 training images" in schedule and "instead of 4 to train at least 500 steps" in schedule
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97, summary


def test_arrays_from_python_train_and_evaluate_in_a_new_process(fmnist, tmp_path, cache_env):
    x = fmnist.train.images[:1500, 0].numpy().astype(np.float32) / 255  # (N, H, W) floats in [0, 1]
    y = fmnist.train.labels[:1500].numpy()
    xt, yt = fmnist.test.images[:500].permute(0, 2, 3, 1).numpy(), fmnist.test.labels[:500]  # (N, H, W, 1) uint8
    run = cnnlab.train(data=(x, y), test_data=(xt, yt), class_names=fmnist.class_names, epochs=2,
                       out=str(tmp_path / "run"), progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 1500
    card = json.loads((run / "model.json").read_text())
    assert card["class_names"] == fmnist.class_names and "0-1 scaled to uint8" in card["dataset"]
    result = cnnlab_cli("evaluate", str(run), "--no-progress", env=cache_env)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["images"] == 500 and report["accuracy"] == pytest.approx(summary["test_accuracy"])
    # the scale was recorded right: the model classifies image files as well as the arrays
    pngs = tmp_path / "png"
    write_images(pngs, fmnist.test, fmnist.class_names, ["Trouser"], 20)
    trousers = cnnlab.Classifier.load(run).predict(sorted((pngs / "Trouser").glob("*.png")))
    assert sum(p[0].label == "Trouser" for p in trousers) >= 16


class PILDataset(torch.utils.data.Dataset):
    """A map-style Dataset of (PIL image, label), as torchvision's datasets yield them."""
    def __init__(self, split, n: int, classes: list[str]):
        self.split, self.n, self.classes = split, n, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return Image.fromarray(self.split.images[i, 0].numpy(), mode="L"), int(self.split.labels[i])


def test_a_torch_dataset_trains_with_a_stratified_test_hold_out(fmnist, tmp_path, cache_env):
    dataset = PILDataset(fmnist.train, 1200, fmnist.class_names)
    run = cnnlab.train(data=dataset, epochs=1, out=str(tmp_path / "run"), progress=False)
    card = json.loads((run / "model.json").read_text())
    assert card["class_names"] == fmnist.class_names  # from dataset.classes
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else None
    assert report is None
    test_images = 1200 - summary["train_images"]
    assert 110 <= test_images <= 130  # 10% of every class held out for the test
    result = cnnlab_cli("report", str(run), "--no-progress", env=cache_env)
    assert result.returncode == 0, result.stderr


def test_valid_folder_keeps_the_best_epoch_and_stops_early(fmnist, tmp_path, cache_env):
    root = tmp_path / "data"
    write_images(root / "Train", fmnist.train, fmnist.class_names, EASY, 60)
    write_images(root / "valid", fmnist.train, fmnist.class_names, EASY, 30, start=60)
    write_images(root / "test", fmnist.test, fmnist.class_names, EASY, 30)
    result = cnnlab_cli("train", "--dataset", f"folder:{root}", "--epochs", "12", "--lr", "2", "--early-stop", "2",
                        "--out", str(tmp_path / "run"), "--no-progress", env=cache_env)
    assert result.returncode == 0, result.stderr
    assert "train <- Train/ (240 images), val <- valid/ (120 images), test <- test/ (120 images)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] is not None for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(range(len(records)), key=lambda i: (records[i]["val_accuracy"], -i)) + 1
    assert summary["kept_epoch"] == best and summary["best_val_accuracy"] == records[best - 1]["val_accuracy"]
    if summary["epochs"] < 12:  # stopped early: two epochs after the best without a better one
        assert summary["epochs"] == best + 2 and "stopping early" in result.stdout
    if best < summary["epochs"]:
        assert f"keeping the weights of epoch {best}" in result.stdout
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_train_and_valid_only_never_choose_on_the_test_split(fmnist, tmp_path, capsys):
    root = tmp_path / "data"
    write_images(root / "train", fmnist.train, fmnist.class_names, EASY, 40)
    write_images(root / "valid", fmnist.train, fmnist.class_names, EASY, 10, start=40)
    write_images(root / "holdout", fmnist.test, fmnist.class_names, EASY, 10)
    line = usage_error(["train", "--dataset", f"folder:{root}", "--epochs", "1", "--no-progress"], capsys)
    assert "split folders (train/, valid/) and other folders (holdout/)" in line
    (root / "holdout").rename(tmp_path / "holdout")
    assert cnnlab.cli.main(["train", "--dataset", f"folder:{root}", "--epochs", "1", "--out", str(tmp_path / "b"),
                            "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test <- same as val" in out
    assert "keeping the best epoch off: the validation split is also the test split" in out
    # a flag names the test folder, wherever it is
    assert cnnlab.cli.main(["train", "--dataset", f"folder:{root}", "--split-folder", f"test={tmp_path / 'holdout'}",
                            "--epochs", "1", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test <- " in out and "holdout" in out and "(40 images)" in out


def test_a_finished_run_is_not_overwritten_unless_asked(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--limit-train", "200", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert cnnlab.cli.main(args) == 0
    (out / "eval.json").write_text("{}")  # a later command's file
    weights = (out / "model.safetensors").read_bytes()
    refused = cnnlab_cli(*args)  # in a fresh process, as a user meets it
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds a finished run" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == weights
    # rerunning a run's own config.yaml (which records out:) is refused the same way
    assert "holds a finished run" in usage_error(["train", "--config", str(out / "config.yaml")], capsys)
    assert cnnlab.cli.main([*args, "--overwrite", "--seed", "1"]) == 0
    assert not (out / "eval.json").exists()  # nothing stale survives the new run
    assert (out / "model.safetensors").read_bytes() != weights


def test_init_from_a_run_on_other_classes_replaces_the_head(fmnist, tmp_path, cache_env):
    base = tmp_path / "others"
    write_images(base / "train", fmnist.train, fmnist.class_names, OTHERS, 40)
    write_images(base / "test", fmnist.test, fmnist.class_names, OTHERS, 10)
    assert cnnlab.cli.main(["train", "--dataset", f"folder:{base}", "--epochs", "1", "--out", str(tmp_path / "base"),
                            "--no-progress"]) == 0
    small = tmp_path / "small"
    write_images(small / "train", fmnist.train, fmnist.class_names, EASY, 20)
    write_images(small / "test", fmnist.test, fmnist.class_names, EASY, 10)
    result = cnnlab_cli("train", "--dataset", f"folder:{small}", "--init-from", str(tmp_path / "base"),
                        "--epochs", "1", "--out", str(tmp_path / "tuned"), "--no-progress", env=cache_env)
    assert result.returncode == 0, result.stderr
    assert "the classifier head head.weight, head.bias is new (6 -> 4 classes)" in result.stdout
    result = cnnlab_cli("train", "--dataset", f"folder:{small}", "--init-from", str(tmp_path / "base"),
                        "--model-arg", "widths=[8,16,32]", "--epochs", "1", "--out", str(tmp_path / "x"),
                        "--no-progress", env=cache_env)
    assert result.returncode == 2 and "--model-arg differ from those" in result.stderr and len(result.stderr.splitlines()) == 1


def test_pretrained_offline_names_the_file_and_folder(tmp_path, capsys, cache_env):
    result = cnnlab_cli("train", "--model", "tv:resnet18", "--pretrained", "--limit-train", "100", "--epochs", "1",
                        "--out", str(tmp_path / "run"), "--no-progress",
                        env={**cache_env, "TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("cnnlab: error: --pretrained") and "Traceback" not in result.stderr
    assert "resnet18-f37072fd.pth" in line and str(tmp_path / "torch") in line
    assert "works for torchvision models" in usage_error(["train", "--pretrained", "--no-progress"], capsys)
