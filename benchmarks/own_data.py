"""Small datasets with the default recipe, a torchvision model with the defaults, and fine-tuning
against training from scratch: `python -m benchmarks own-data [--cifar PATH] [--torchvision]`.

Builds its folders from Fashion-MNIST (and a CIFAR-10 class-folder copy when given), then trains
each configuration in its own `cnnlab train` process, side by side, and prints one table:
test accuracy on the full test split of the classes used, and training seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EASY = ["Trouser", "Bag", "Sneaker", "Sandal"]  # the 4-class small set
OTHERS = ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt", "Ankle boot"]  # what the base model learns first
# The defaults before the step budget: the fast recipe's 4 epochs at batch 256, whatever the size.
FIXED_EPOCHS = ["--epochs", "4", "--batch-size", "256"]
# tv:NAME with the fast recipe's settings as they used to apply to it: whitened stem, SGD at 0.2.
OLD_FOREIGN = ["--whiten", "--optimizer", "sgd", "--lr", "0.2"]


def _fmnist_folder(root: Path, classes: list[str], per_class_train: int | None, per_class_test: int | None,
                   offset: int = 0) -> Path:
    """train/ and test/ folders of PNGs of `classes` (all images when a count is None)."""
    import torch
    from PIL import Image

    from cnnlab.data.load import load_dataset

    bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
    for split_name, split, count in (("train", bundle.train, per_class_train), ("test", bundle.test, per_class_test)):
        for name in classes:
            index = torch.nonzero(split.labels == bundle.class_names.index(name)).flatten()
            index = index[offset:offset + count] if count is not None else index
            folder = root / split_name / name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i in index.tolist():
                Image.fromarray(split.images[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
    return root


def _cifar_subset(source: Path, root: Path, per_class: int) -> Path:
    """The first per_class training images of each class (symlinks) and the whole test split."""
    for class_dir in sorted((source / "train").iterdir()):
        target = root / "train" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            (target / path.name).symlink_to(path.resolve())
    (root / "test").symlink_to((source / "test").resolve())
    return root


def _train(name: str, out: Path, args: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", *args, "--out", str(out), "--no-progress"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"name": name, "error": result.stderr.strip()[-300:]}
    summary = json.loads((out / "summary.json").read_text())
    schedule = next((line for line in result.stdout.splitlines() if line.startswith("schedule:")), "")
    return {"name": name, "accuracy": summary["test_accuracy"], "train_seconds": summary["train_seconds"],
            "process_seconds": round(time.perf_counter() - start, 1), "epochs": summary["epochs"],
            "schedule": schedule, "command": "cnnlab train " + " ".join(args)}


def run(cifar: Path | None, torchvision: bool, workdir: Path | None = None) -> list[dict[str, Any]]:
    work = Path(workdir or tempfile.mkdtemp(prefix="cnnlab-own-data-"))
    os.environ.setdefault("CNNLAB_CACHE", str(work / "cache"))
    results = []
    small = _fmnist_folder(work / "fmnist-600", EASY, 150, None)
    results.append(_train("fmnist 600 images, 4 classes: defaults", work / "r1", ["--dataset", f"folder:{small}"]))
    results.append(_train("fmnist 600 images, 4 classes: 4 epochs at batch 256 (the old defaults)", work / "r2",
                          ["--dataset", f"folder:{small}", *FIXED_EPOCHS]))
    if cifar is not None:
        c5k = _cifar_subset(cifar, work / "cifar-5k", 500)
        results.append(_train("cifar-10 5,000 images: defaults", work / "r3", ["--dataset", f"folder:{c5k}"]))
        results.append(_train("cifar-10 5,000 images: 4 epochs at batch 256 (the old defaults)", work / "r4",
                              ["--dataset", f"folder:{c5k}", *FIXED_EPOCHS]))
        if torchvision:
            results.append(_train("cifar-10 5,000 images: tv:resnet18, defaults", work / "r5",
                                  ["--dataset", f"folder:{c5k}", "--model", "tv:resnet18"]))
            results.append(_train("cifar-10 5,000 images: tv:resnet18, the fast recipe's fastnet settings "
                                  "(the old defaults)", work / "r6",
                                  ["--dataset", f"folder:{c5k}", "--model", "tv:resnet18", *OLD_FOREIGN,
                                   *FIXED_EPOCHS]))
    # Fine-tuning: a model of the other 6 classes, then 4 new classes from few images, against
    # training from scratch with the same schedule (the defaults' 500 steps).
    base_data = _fmnist_folder(work / "fmnist-6", OTHERS, None, 100)
    base = _train("base: fmnist, the other 6 classes (36,000 images), defaults", work / "base",
                  ["--dataset", f"folder:{base_data}"])
    results.append(base)
    for per_class in (10, 100):
        few = _fmnist_folder(work / f"fmnist-4x{per_class}", EASY, per_class, None, offset=1000)
        label = f"fmnist {4 * per_class} images, 4 classes"
        results.append(_train(f"{label}: from scratch", work / f"s{per_class}", ["--dataset", f"folder:{few}"]))
        results.append(_train(f"{label}: --init-from the 6-class base", work / f"f{per_class}",
                              ["--dataset", f"folder:{few}", "--init-from", str(work / "base")]))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | test accuracy | training s | epochs |", "|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['name']} | {r['accuracy']:.2%} | {r['train_seconds']:.1f} | {r['epochs']} |")
    return "\n".join(lines)
