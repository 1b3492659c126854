"""Folder datasets laid out in split folders as tools write them (train/, valid/, Test/, ...):
which folder becomes which split, the errors for ambiguous layouts, split_folders, and the
one line that says where each split came from."""

from __future__ import annotations

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

from cnnlab.cli import main
from cnnlab.data.folder import prepare_folder
from cnnlab.data.load import load_dataset
from cnnlab.data.split import Split
from cnnlab.errors import CnnlabError

pytestmark = [needs_fmnist, pytest.mark.usefixtures("use_cache_env")]

CLASSES = ["Coat", "Dress", "Pullover", "Trouser"]  # Fashion-MNIST classes whose names make folder names
PER_CLASS = 16  # images of each class in the pool; the splits below take disjoint runs of them


@pytest.fixture(scope="module")
def pool() -> dict[str, list[np.ndarray]]:
    """PER_CLASS Fashion-MNIST test images of each class in CLASSES, as 28x28 uint8 arrays."""
    bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
    out = {}
    for name in CLASSES:
        index = torch.nonzero(bundle.test.labels == bundle.class_names.index(name)).flatten()[:PER_CLASS]
        out[name] = [bundle.test.images[i, 0].numpy() for i in index]
    return out


def write_split(folder: Path, pool: dict[str, list[np.ndarray]], start: int, count: int) -> set[bytes]:
    """Images start..start+count-1 of each class as PNG files in folder/CLASS/; their pixels."""
    written = set()
    for name, images in pool.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            Image.fromarray(images[i], mode="L").save(folder / name / f"{i:02d}.png")
            written.add(images[i].tobytes())
    return written


def pixels(split: Split) -> set[bytes]:
    return {image[0].numpy().tobytes() for image in split.images[:]}


def test_train_and_valid_without_test(tmp_path: Path, pool) -> None:
    root = (tmp_path / "flowers").resolve()
    write_split(root / "train", pool, 0, 12)
    valid = write_split(root / "valid", pool, 12, 4)
    bundle = load_dataset(f"folder:{root}", progress=False)
    assert bundle.class_names == CLASSES  # never "train" and "valid"
    assert (len(bundle.train), len(bundle.val)) == (48, 16) and bundle.test is bundle.val
    assert pixels(bundle.val) == valid
    assert bundle.origin_line == (f"folder:{root}: train <- train/ (48 images), val <- valid/ (16 images), "
                                  "test <- same as val")


def test_split_names_are_case_insensitive_and_all_three_are_used(tmp_path: Path, pool) -> None:
    root = (tmp_path / "exported").resolve()
    train = write_split(root / "TRAIN", pool, 0, 10)
    val = write_split(root / "Validation", pool, 10, 2)
    test = write_split(root / "Test", pool, 12, 4)
    bundle = load_dataset(f"folder:{root}", val_split=0.5, progress=False)  # a val folder: no hold-out
    assert bundle.class_names == CLASSES
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 8, 16)
    assert (pixels(bundle.train), pixels(bundle.val), pixels(bundle.test)) == (train, val, test)
    assert torch.bincount(bundle.test.labels).tolist() == [4, 4, 4, 4]
    assert bundle.origin == {"train": "TRAIN/ (40 images)", "val": "Validation/ (8 images)",
                             "test": "Test/ (16 images)"}


def test_other_names_and_hold_outs(tmp_path: Path, pool) -> None:
    root = tmp_path / "tools"
    write_split(root / "training", pool, 0, 10)
    test = write_split(root / "testing", pool, 10, 3)
    bundle = load_dataset(f"folder:{root}", val_split=0.2, progress=False)  # no val folder: held out of train
    assert (len(bundle.train), len(bundle.val), pixels(bundle.test)) == (32, 8, test)
    assert bundle.origin["val"] == "20% stratified hold-out of training/ (8 images)"
    (root / "testing").rename(tmp_path / "elsewhere")  # training/ alone: held out like a flat folder
    alone = load_dataset(f"folder:{root}", val_split=0, progress=False)
    assert (len(alone.train), len(alone.val)) == (36, 4) and alone.test is alone.val
    assert alone.class_names == CLASSES
    assert alone.origin["test"] == "same as val"
    done = prepare_folder(str(root), progress=False)
    assert done.folders == {"train": "training/"} and done.counts == {"train": 40}


def test_mixed_top_level_is_one_clear_error(tmp_path: Path, pool, capsys) -> None:
    root = tmp_path / "mixed"
    write_split(root / "train", pool, 0, 2)
    write_split(root / "test", pool, 2, 1)
    (root / "cat").mkdir()  # a class folder beside the split folders
    Image.fromarray(pool["Coat"][3], mode="L").save(root / "cat" / "stray.png")
    line = usage_error(["datasets", "prepare", f"folder:{root}", "--no-progress"], capsys)
    assert "train/, test/" in line and "(cat/)" in line and "train/cat/" in line


def test_two_folders_for_one_split(tmp_path: Path, pool, capsys) -> None:
    root = tmp_path / "twice"
    write_split(root / "train", pool, 0, 2)
    write_split(root / "val", pool, 2, 1)
    write_split(root / "valid", pool, 3, 1)
    line = usage_error(["datasets", "prepare", f"folder:{root}", "--no-progress"], capsys)
    assert "2 val folders (val/, valid/)" in line
    (root / "train").rename(root / "pictures")
    with pytest.raises(CnnlabError, match="no train folder"):
        load_dataset(f"folder:{root}", split_folders={"val": "val"}, progress=False)


def test_split_folders_override(tmp_path: Path, pool) -> None:
    root = (tmp_path / "named").resolve()
    write_split(root / "train", pool, 0, 8)
    write_split(root / "val", pool, 8, 2)
    holdout = write_split(root / "holdout", pool, 10, 3)
    outside = write_split(tmp_path / "final", pool, 13, 3)
    with pytest.raises(CnnlabError, match="holds both split folders"):  # holdout/ looks like a class
        load_dataset(f"folder:{root}", progress=False)
    bundle = load_dataset(f"folder:{root}", split_folders={"val": "holdout", "test": str(tmp_path / "final")},
                          progress=False)
    assert bundle.class_names == CLASSES
    assert (pixels(bundle.val), pixels(bundle.test)) == (holdout, outside)
    assert bundle.origin_line == (f"folder:{root}: train <- train/ (32 images), val <- holdout/ (12 images), "
                                  f"test <- {tmp_path / 'final'}/ (12 images)")
    # the mapping is part of the cache key: the same files as other splits are another prepared dataset
    plain = prepare_folder(str(root), split_folders={"val": "val", "test": "holdout"}, progress=False)
    swapped = prepare_folder(str(root), split_folders={"val": "holdout", "test": "val"}, progress=False)
    assert plain.cache != swapped.cache and (plain.counts["val"], swapped.counts["val"]) == (8, 12)
    with pytest.raises(CnnlabError, match="'holdout', which is not a split; use train, val, test"):
        load_dataset(f"folder:{root}", split_folders={"holdout": "holdout"}, progress=False)
    with pytest.raises(CnnlabError, match="'missing' as the val folder"):
        load_dataset(f"folder:{root}", split_folders={"val": "missing"}, progress=False)
    with pytest.raises(CnnlabError, match="folder:PATH datasets"):
        load_dataset("fashion-mnist", split_folders={"val": "holdout"}, progress=False)


def test_show_and_prepare_print_the_split_folders(tmp_path: Path, pool, cache_env: dict[str, str], capsys) -> None:
    root = (tmp_path / "shown").resolve()
    write_split(root / "Train", pool, 0, 4)
    write_split(root / "dev", pool, 4, 2)
    assert main(["datasets", "prepare", f"folder:{root}", "--no-progress"]) == 0
    assert "; split folders: train <- Train/, val <- dev/; converted in" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-m", "cnnlab", "datasets", "show", f"folder:{root}", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **cache_env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"folder:{root}: train <- Train/ (16 images), val <- dev/ (8 images), "
                                          "test <- same as val", f"wrote {out}"]
    assert out.is_file()
