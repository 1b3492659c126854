"""Prepared folder datasets: conversion to raw uint8 files, reading rows from disk, the cache's
life cycle (reuse, rebuild, waiting for another process), `cnnlab datasets prepare`, and a
training run over a dataset several times larger than the memory it may use.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_usage_error
from test_cli import cnnlab as run_cnnlab
from usage import usage_error

import cnnlab.data.folder
import cnnlab.data.prepared
from cnnlab.data.batches import channel_stats
from cnnlab.data.folder import prepare_folder
from cnnlab.data.load import load_dataset
from cnnlab.data.prepared import META_FILE, DiskImages, images_file, labels_file
from cnnlab.errors import CnnlabError, InvalidSetting
from cnnlab.images.tensors import read_image, resize, to_channels

pytestmark = pytest.mark.usefixtures("use_cache_env")


def save(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image of `size` (width, height): resizing it shows every rounding difference."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """train/ and test/ splits of PNG and JPEG files of several sizes and modes, one file corrupt."""
    root = tmp_path / "photos"
    save(root / "train" / "cat" / "a.png", noise((40, 30), seed=1))
    save(root / "train" / "cat" / "b.jpg", noise((28, 20), seed=2), quality=90)
    save(root / "train" / "cat" / "c.png", noise((24, 24), "L", seed=3))
    (root / "train" / "cat" / "d.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    save(root / "train" / "dog" / "e.png", noise((50, 20), "RGBA", seed=4))
    save(root / "train" / "dog" / "f.jpg", noise((36, 36), seed=5), quality=95)
    save(root / "test" / "cat" / "g.png", noise((32, 32), seed=6))
    save(root / "test" / "dog" / "h.jpg", noise((30, 33), "L", seed=7))
    return root


def files_of(root: Path, split: str) -> list[tuple[Path, int]]:
    return [(f, label) for label, cls in enumerate(["cat", "dog"]) for f in sorted((root / split / cls).iterdir())]


# --------------------------------------------------------------------------- conversion

def test_conversion_equals_decoding_each_file(photos: Path, capsys: pytest.CaptureFixture) -> None:
    done = prepare_folder(str(photos), progress=False)
    # good files' longest sides: 40 28 24 50 36 | 32 33 -> median 33; one colour image makes it RGB
    assert (done.channels, done.image_size) == (3, 33)
    assert done.counts == {"train": 5, "test": 2} and done.converted
    ((name, reason),) = done.skipped
    assert name == os.path.join("train", "cat", "d.jpg") and reason
    assert "d.jpg" in capsys.readouterr().err  # the one-line warning, as before
    meta = json.loads((done.cache / META_FILE).read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["splits"]["train"]["count"] == 5

    bundle = load_dataset(f"folder:{photos}", val_split=0, progress=False)
    for split, data in (("train", bundle.train), ("test", bundle.test)):
        good = [(f, label) for f, label in files_of(photos, split) if f.name != "d.jpg"]
        expected = torch.stack([resize(to_channels(read_image(f), 3), (33, 33)) for f, _ in good])
        assert isinstance(data.images, DiskImages)
        assert torch.equal(data.images[:], expected)  # bit for bit what decoding in memory gives
        assert data.labels.tolist() == [label for _, label in good]
    # normalised alike on disk (CPU training) and copied to a device (CUDA training), to the last bit
    assert channel_stats(bundle.train.images) == channel_stats(bundle.train.images.tensor())


def test_second_load_reuses_the_cache_and_a_changed_file_rebuilds_it(photos: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = prepare_folder(str(photos), progress=False)
    stamp = (first.cache.stat().st_ino, (first.cache / META_FILE).stat().st_mtime_ns)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(cnnlab.data.folder, "read_image", no_decoding)
        m.setattr(cnnlab.data.folder.Image, "open", no_decoding)
        again = prepare_folder(str(photos), progress=False)
        bundle = load_dataset(f"folder:{photos}", val_split=0, progress=False)
    assert not again.converted and again.cache == first.cache and again.seconds == 0
    assert (first.cache.stat().st_ino, (first.cache / META_FILE).stat().st_mtime_ns) == stamp
    assert len(bundle.train) == 5

    target = photos / "test" / "cat" / "g.png"
    save(target, Image.new("RGB", (32, 32), (1, 2, 3)))
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    changed = prepare_folder(str(photos), progress=False)
    assert changed.converted and changed.cache != first.cache
    test = load_dataset(f"folder:{photos}", val_split=0, progress=False).test
    assert test.images[0, :, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncated images", "garbled meta", "labels missing", "labels out of range",
                                    "leftovers of a crash"])
def test_damaged_cache_is_rebuilt(photos: Path, damage: str) -> None:
    first = prepare_folder(str(photos), progress=False)
    expected = load_dataset(f"folder:{photos}", val_split=0, progress=False).train.images[:]
    cache = first.cache
    if damage == "truncated images":
        with open(images_file(cache, "train"), "r+b") as fh:
            fh.truncate(1000)
    elif damage == "garbled meta":
        (cache / META_FILE).write_text('{"format": 1, "spl')
    elif damage == "labels missing":
        labels_file(cache, "test").unlink()
    elif damage == "labels out of range":
        np.array([0, 1, 7, 0, 1], dtype="<i8").tofile(labels_file(cache, "train"))
    else:  # a conversion killed half-way: its temporary directory, and no cache yet
        shutil.rmtree(cache)
        (cache.parent / f"{cache.name}.tmp-12345").mkdir()
        (cache.parent / f"{cache.name}.tmp-12345" / "train.images.u8").write_bytes(b"\0" * 100)
    again = prepare_folder(str(photos), progress=False)
    assert again.converted
    assert torch.equal(load_dataset(f"folder:{photos}", val_split=0, progress=False).train.images[:], expected)
    assert [p.name for p in cache.parent.glob(f"{cache.name}*") if p.is_dir()] == [cache.name]  # leftovers cleared


def test_a_second_process_waits_for_the_conversion_in_progress(photos: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    fcntl = pytest.importorskip("fcntl")
    done = prepare_folder(str(photos), progress=False)
    finished = tmp_path / "finished-elsewhere"
    done.cache.rename(finished)
    lock = done.cache.with_name(done.cache.name + ".lock")

    def no_decoding(path):
        raise AssertionError(f"decoded {path}: converted a second time instead of waiting")

    monkeypatch.setattr(cnnlab.data.folder, "read_image", no_decoding)
    monkeypatch.setattr(cnnlab.data.folder.Image, "open", no_decoding)
    result: dict = {}
    with open(lock, "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # as the converting process holds it
        waiter = threading.Thread(target=lambda: result.update(bundle=load_dataset(f"folder:{photos}", val_split=0,
                                                                                   progress=False)))
        waiter.start()
        time.sleep(3 * cnnlab.data.prepared.POLL_SECONDS)
        assert waiter.is_alive() and not done.cache.exists()
        finished.rename(done.cache)  # the other process completes its conversion, then lets go
    waiter.join(timeout=30)
    assert len(result["bundle"].train) == 5
    assert "waiting for" in capsys.readouterr().err

    # a holder that has shown no progress for too long is reported, not waited on forever
    shutil.rmtree(done.cache)
    with open(lock, "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        long_ago = time.time() - 2 * cnnlab.data.prepared.STALL_SECONDS
        os.utime(lock, (long_ago, long_ago))
        with pytest.raises(CnnlabError, match="no progress"):
            prepare_folder(str(photos), progress=False)


# --------------------------------------------------------------------------- reading from disk

def test_disk_images_read_like_a_tensor(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (23, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "x.images.u8"
    path.write_bytes(data.numpy().tobytes())
    disk = DiskImages(path, data.shape)
    assert disk.shape == data.shape and len(disk) == 23 and disk.dtype == torch.uint8 and disk.device.type == "cpu"
    index = torch.tensor([[5, 0, 22], [-1, 5, 6]])
    mask = torch.arange(23) % 3 == 0
    keys = (4, -2, torch.tensor(7), slice(None), slice(3, 17, 4), slice(30, 40), slice(-5, None), index,
            torch.tensor([], dtype=torch.int64), mask, [1, 2, 3], (), (slice(2, 9), 1), (3, 0, 2),
            (-1, slice(None), 1), (index, 2, 1, 0), (index, slice(None), 1), (mask, 1),
            (torch.tensor([3, 3, 1]), slice(None), torch.tensor([0, 2, 4])))
    for key in keys:
        assert torch.equal(disk[key], data[key]), key
    for bad in (23, -24, torch.tensor([0, 23]), torch.tensor([True, False])):
        with pytest.raises(IndexError):
            disk[bad]

    # subsets stay on disk and compose; anything else works on the rows in memory
    keep = torch.tensor([20, 3, 3, 9, 10, 11])
    sub = disk.subset(keep).subset(torch.tensor([5, 0, 1]))
    assert isinstance(sub, DiskImages) and torch.equal(sub[:], data[keep][torch.tensor([5, 0, 1])])
    assert torch.equal(torch.cat([sub, disk[:2]]), torch.cat([data[keep][[5, 0, 1]], data[:2]]))
    assert torch.equal(disk.float(), data.float()) and torch.equal(disk.to(torch.float64), data.double())
    assert torch.equal(resize(sub, (3, 2)), resize(data[keep][[5, 0, 1]], (3, 2)))
    assert torch.equal(pickle.loads(pickle.dumps(sub))[:], sub[:])
    with pytest.raises(AttributeError):
        disk.no_such_method


def test_flat_folder_hold_out_selects_rows_without_reading_them(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for c in range(2):
        for k in range(10):
            save(root / f"class{c}" / f"{k}.png", Image.new("L", (8, 8), 10 * c + k))
    bundle = load_dataset(f"folder:{root}", val_split=0.2, progress=False)
    assert isinstance(bundle.train.images, DiskImages) and isinstance(bundle.val.images, DiskImages)
    assert bundle.train.images.path == bundle.val.images.path  # one file, two selections of its rows
    values = sorted(bundle.train.images[:, 0, 0, 0].tolist() + bundle.val.images[:, 0, 0, 0].tolist())
    assert values == list(range(20))


# --------------------------------------------------------------------------- the command

def test_prepare_command(photos: Path, cache_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cnnlab("datasets", "prepare", f"folder:{photos}", "--no-progress", "--workers", "2", env=cache_env)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"prepared folder:{photos.resolve()}: 5 train / 2 test images, 33x33 RGB")
    assert "converted in" in line and line.endswith("1 file skipped")
    assert_usage_error(run_cnnlab("datasets", "prepare", f"folder:{tmp_path / 'missing'}", env=cache_env),
                       "does not exist")


def test_prepare_command_takes_only_folders(capsys: pytest.CaptureFixture) -> None:
    assert "folder:PATH" in usage_error(["datasets", "prepare", "fashion-mnist"], capsys)
    assert "--workers must be at least 1, got 0." in usage_error(["datasets", "prepare", "folder:.", "--workers", "0"],
                                                                 capsys)
    assert "--image-size must be at least 1 pixel" in usage_error(["datasets", "prepare", "folder:.",
                                                                   "--image-size", "0"], capsys)
    for setting in ("workers", "image_size"):  # the library names its parameters; the CLI, its flags
        with pytest.raises(InvalidSetting, match=f"^{setting} must be at least 1"):
            prepare_folder(".", **{setting: 0})


# --------------------------------------------------------------------------- memory

DATASET_BYTES = 384 << 20  # training images on disk
RSS_BUDGET = 96 << 20  # the most a training run over all of them may add to the peak RSS
SIDE = 64

TRAIN_WITHIN_BUDGET = """
import json, resource, sys
import cnnlab.training.trainer

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) * 1024

def rss():
    return status("VmRSS")

def peak():
    # VmHWM, this process's own high-water mark: on Linux ru_maxrss keeps, across exec, the peak of
    # the process that forked this one (pytest's, here, hundreds of MiB late in the suite), so it
    # is a floor, not this run's peak; both are printed.
    return status("VmHWM")

# One thread: on a busy 2-core machine two can be ten times slower; the model is the cheapest.
settings = dict(dataset="folder:" + sys.argv[1], model="fastnet", model_args={"widths": [4]}, epochs=1,
                batch_size=32, val_split=0, translate=0, precision="fp32", threads=1, progress=False)
cnnlab.training.trainer.train(limit_train=64, out=sys.argv[2] + "/warm-up", **settings)  # imports, first allocations
before = rss()
cnnlab.training.trainer.train(out=sys.argv[2] + "/run", **settings)
print(json.dumps({"before": before, "peak": peak(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmRSS from /proc and ru_maxrss in KiB")
def test_training_on_a_dataset_four_times_its_rss_budget(tmp_path: Path, cache_env: dict[str, str]) -> None:
    """A real 1-epoch training run, in a subprocess, through `folder:PATH` as `cnnlab train` goes,
    over 384 MiB of images: its peak RSS grows by less than 96 MiB. The folder holds a few real
    files; their prepared cache is then enlarged in place with random images in the same format."""
    root = tmp_path / "big"
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            for k in range(4):
                save(root / split / cls / f"{k}.png", noise((SIDE, SIDE), seed=10 * c + k))
    cache = prepare_folder(str(root), progress=False).cache
    row = 3 * SIDE * SIDE
    n = DATASET_BYTES // row
    rng = np.random.default_rng(0)
    try:
        with open(images_file(cache, "train"), "wb") as fh:
            for start in range(0, n, 2048):
                fh.write(rng.integers(0, 256, (min(2048, n - start), row), dtype=np.uint8).tobytes())
        rng.integers(0, 2, n).astype("<i8").tofile(labels_file(cache, "train"))
        meta = json.loads((cache / META_FILE).read_text())
        meta["splits"]["train"]["count"] = n
        (cache / META_FILE).write_text(json.dumps(meta))

        result = subprocess.run([sys.executable, "-c", TRAIN_WITHIN_BUDGET, str(root), str(tmp_path)],
                                capture_output=True, text=True, timeout=600, env={**os.environ, **cache_env})
        assert result.returncode == 0, result.stderr
        assert f"{n:,} train / 0 val / 8 test images" in result.stdout  # the enlarged cache was trained on
        usage = json.loads(result.stdout.strip().splitlines()[-1])
        growth = usage["peak"] - usage["before"]
        assert growth < RSS_BUDGET, f"training added {growth / 2**20:.0f} MiB to the peak RSS"
        assert DATASET_BYTES >= 4 * RSS_BUDGET
    finally:
        images_file(cache, "train").unlink(missing_ok=True)  # pytest keeps the last runs' tmp_path
