"""Bad input everywhere: a folder dataset full of awkward and broken files trains anyway, and every
wrong flag or config value is one clear line with exit status 2.

The corpus holds every kind of file users have: broken ones (empty, truncated, text named .jpg),
odd but valid ones (CMYK, 16-bit, palette, RGBA, animated, EXIF-rotated, a PNG named .jpg),
unicode and non-UTF-8 names, hidden files, an empty class, a class of broken files only, and over
a thousand classes of one or two images.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_usage_error, cnnlab
from usage import usage_error

from cnnlab.data.folder import load_folder
from cnnlab.images.tensors import decode_image_bytes, read_image
from cnnlab.rundir import RunDir

MANY = 1005  # tiny classes: more than ImageNet's 1,000
RED, BLUE = (220, 30, 40), (20, 40, 210)
pytestmark = pytest.mark.usefixtures("use_cache_env")


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def near(pixel: torch.Tensor, rgb: tuple[int, int, int], tolerance: int = 24) -> bool:
    return bool((pixel.int() - torch.tensor(rgb)).abs().max() <= tolerance)


def halves(size: tuple[int, int] = (32, 16)) -> Image.Image:
    """RGB, left half RED, right half BLUE; 8-pixel blocks keep JPEG from blending the colours much."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


def palette(transparent: bool) -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))  # left half index 0 (RED, or transparent)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(halves(), "JPEG", quality=95, exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


PNG = encode(halves(), "PNG")
JPEG = encode(halves(), "JPEG", quality=95)
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
NOISE_PNG, NOISE_JPEG = encode(NOISE, "PNG"), encode(NOISE, "JPEG")  # large enough to cut in the pixel data

# readable files of class "alpha", each with a check of its decoded pixels (C, H, W)
ODD_BUT_VALID: dict[str, tuple[bytes, Callable[[torch.Tensor], bool]]] = {
    "png-named.jpg": (PNG, lambda x: torch.equal(x, decode_image_bytes(PNG))),
    "cmyk.jpg": (encode(halves().convert("CMYK"), "JPEG", quality=95),
                 lambda x: near(x[:, 8, 4], RED) and near(x[:, 8, 28], BLUE)),
    "deep16.png": (encode(Image.fromarray(np.full((16, 16), 0x8080, np.uint16)), "PNG"),
                   lambda x: x.shape[0] == 1 and bool((x == 0x80).all())),  # scaled to 8 bits, not clipped
    "palette.png": (palette(False), lambda x: x[:, 0, 0].tolist() == list(RED) and x[:, 0, 15].tolist() == list(BLUE)),
    "palette-transparent.png": (palette(True), lambda x: x[:, 0, 0].tolist() == [255] * 3),  # over white
    "rgba.png": (encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"),
                 lambda x: x[:, 0, 0].tolist() == [255, 127, 127]),
    "animated.gif": (animated_gif(), lambda x: x.shape == (3, 16, 16) and near(x[:, 0, 0], RED)),
    # stored 32 wide and 16 high; displayed rotated: 16 wide, 32 high, the red half on top
    "rotated.jpg": (rotated_jpeg(), lambda x: x.shape == (3, 32, 16) and near(x[:, 4, 8], RED)
                    and near(x[:, 28, 8], BLUE)),
}
BROKEN = {
    "alpha/empty.jpg": b"",
    "alpha/truncated.jpg": NOISE_JPEG[:len(NOISE_JPEG) // 2],
    "alpha/truncated.png": NOISE_PNG[:len(NOISE_PNG) // 2],
    "alpha/notes.jpg": b"a shopping list, not a photo\n",
    "foxtrot/cut.png": NOISE_PNG[:-200],
    "foxtrot/text.png": b"\x89PNG but then nothing of the sort",
}
HIDDEN = {"alpha/.hidden.png": PNG, "alpha/.thumbs/thumb.png": PNG, ".cache/x/y.png": PNG}


def write(root: Path, files: dict[str | bytes, bytes]) -> None:
    for name, data in files.items():
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(name))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def build_corpus(root: Path, broken: bool) -> None:
    """The corpus; without the broken files when `broken` is False (everything else byte-identical)."""
    files: dict[str | bytes, bytes] = {f"alpha/{name}": data for name, (data, _) in ODD_BUT_VALID.items()}
    files.update({"alpha/plain.png": PNG, "echo/only one.png": PNG, **HIDDEN,
                  "délta ünïcode/фото 1.png": PNG, "délta ünïcode/画像 two.jpg": JPEG,
                  "délta ünïcode".encode() + b"/caf\xe9 latin-1.png": PNG})  # a name that is not UTF-8
    tiny = Image.new("L", (6, 6))
    for i in range(MANY):
        tiny.putpixel((0, 0), i % 256)
        for j in range(1 + i % 2):
            files[f"many-{i:04d}/{j}.png"] = encode(tiny, "PNG")
    write(root, files | (BROKEN if broken else {}))
    (root / "charlie (empty)").mkdir()
    (root / "foxtrot").mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "my photos"
    build_corpus(root, broken=True)
    return root


@pytest.fixture(scope="module")
def trained(corpus: Path, cache_env: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`cnnlab train` on the corpus in a real subprocess: (result, run directory)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = cnnlab("train", "--dataset", f"folder:{corpus}", "--epochs", "1", "--batch-size", "64",
                    "--image-size", "16", "--model-arg", "widths=[8,16]", "--out", str(run), "--no-progress",
                    env=cache_env)
    return result, run


EXPECTED_CLASSES = sorted(["alpha", "charlie (empty)", "délta ünïcode", "echo", "foxtrot",
                           *(f"many-{i:04d}" for i in range(MANY))])
READABLE = len(ODD_BUT_VALID) + 1 + 3 + 1 + sum(1 + i % 2 for i in range(MANY))


# ---------------------------------------------------------------- the folder dataset

@pytest.mark.parametrize("name", ODD_BUT_VALID)
def test_odd_but_valid_files_decode_correctly(name: str, corpus: Path) -> None:
    image = read_image(corpus / "alpha" / name)
    assert image.dtype == torch.uint8 and image.shape[0] in (1, 3)
    assert ODD_BUT_VALID[name][1](image), image[:, :2, :2]


def test_broken_files_are_skipped_and_nothing_shifts(corpus: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Against the same corpus without its broken files: the same classes, labels and pixels."""
    bundle = load_folder(str(corpus), val_split=0.1, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    clean_root = tmp_path / "my photos"
    build_corpus(clean_root, broken=False)
    clean = load_folder(str(clean_root), val_split=0.1, progress=False)
    assert capsys.readouterr().err == ""  # nothing to warn about

    assert bundle.class_names == clean.class_names == EXPECTED_CLASSES
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(bundle, split).labels, getattr(clean, split).labels)
        assert torch.equal(getattr(bundle, split).images, getattr(clean, split).images)
    labels = torch.cat([bundle.train.labels, bundle.test.labels])
    counts = torch.bincount(labels, minlength=len(EXPECTED_CLASSES))
    index = {name: i for i, name in enumerate(EXPECTED_CLASSES)}
    assert counts[index["alpha"]] == len(ODD_BUT_VALID) + 1  # the odd files read, the hidden ones not
    assert counts[index["délta ünïcode"]] == 3 and counts[index["echo"]] == 1
    assert counts[index["charlie (empty)"]] == 0 and counts[index["foxtrot"]] == 0
    assert counts[index["many-1003"]] == 2 and counts[index["many-1004"]] == 1 and int(counts.sum()) == READABLE

    assert sorted(line.split(": ")[0] for line in bundle.skipped) == sorted(BROKEN)
    assert len(warnings) == 1, warnings
    assert f"skipped {len(BROKEN)} of {READABLE + len(BROKEN):,} image files" in warnings[0]
    assert "per class: alpha 4, foxtrot 2)" in warnings[0] and "alpha/empty.jpg (empty file)" in warnings[0]


def test_write_skipped_lists_every_file(tmp_path: Path) -> None:
    RunDir(tmp_path).write_skipped(["a/b.jpg: empty file", "ü/c\udce9.png: truncated"])
    assert (tmp_path / RunDir.SKIPPED).read_text(encoding="utf-8").splitlines() == [
        "a/b.jpg: empty file", "ü/c\\udce9.png: truncated"]
    RunDir(tmp_path / "clean").write_skipped([])
    assert not (tmp_path / "clean").exists()


def test_training_on_the_corpus_succeeds_with_one_warning(trained) -> None:
    result, run = trained
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"skipped {len(BROKEN)} of" in warnings[0], result.stderr
    assert "Traceback" not in result.stderr
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == EXPECTED_CLASSES and meta["num_classes"] == len(EXPECTED_CLASSES)
    assert meta["in_channels"] == 3 and meta["image_size"] == [16, 16]


def test_the_run_directory_lists_the_skipped_files(trained) -> None:
    result, run = trained
    assert result.returncode == 0, result.stderr
    listed = (run / RunDir.SKIPPED).read_text(encoding="utf-8").splitlines()
    assert sorted(line.split(": ")[0] for line in listed) == sorted(BROKEN)
    assert json.loads((run / "summary.json").read_text())["skipped_files"] == len(BROKEN)


# ---------------------------------------------------------------- wrong flags and config files

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of two images: where a wrong flag is not caught, training still ends in a second."""
    root = tmp_path_factory.mktemp("tiny")
    write(root, {f"{c}/{i}.png": PNG for c in "ab" for i in range(2)})
    return root


TRAIN_ERRORS = [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--epochs", "two"], "--epochs"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--val-split", "1"], "--val-split must be in [0, 1)"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
    (["--model", "alexnet-9000"], "Unknown model 'alexnet-9000'"),
    (["--model", "tv:nonexistent_net"], "nonexistent_net"),
    (["--dataset", "imagenet-99"], "Unknown dataset 'imagenet-99'"),
    (["--dataset", "folder:/no/such/folder"], "/no/such/folder does not exist"),
    (["--recipe", "turbo"], "Unknown recipe 'turbo'"),
    (["--model-arg", "oops"], "KEY=VALUE"),
    (["--model-arg", "=3"], "KEY=VALUE"),
    (["--model-arg", "widths=[8, 16"], "cannot read the value"),
    (["--model-arg", "widths=[-8]"], "Bad arguments for model 'airnet'"),  # 32x32 colour: the cifar recipe's airnet
    (["--model-arg", "depth=3"], "unexpected keyword argument 'depth'"),
    (["--model-arg", "dropout=2"], "dropout"),
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("args, fragment", TRAIN_ERRORS, ids=[" ".join(a) for a, _ in TRAIN_ERRORS])
def test_wrong_train_flags(args: list[str], fragment: str, tiny: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--dataset", f"folder:{tiny}", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert fragment in usage_error(base + args, capsys)


CONFIG_ERRORS = [
    ("epochs: [1, 2\n", "not valid YAML at line"),
    ("lr: 0.1\n  batch_size: 3\n", "not valid YAML"),
    ("epochz: 3\n", "Unknown configuration key 'epochz'"),
    ("epochs: many\n", "'epochs' must be an integer"),
    ("batch_size: 1.5\n", "'batch_size' must be an integer"),
    ("lr: fast\n", "'lr' must be of type float"),
    ("progress: maybe\n", "'progress' must be true or false"),
    ("model_args: [8, 16]\n", "'model_args' must be of type dict"),
    ("epochs: 0\n", "--epochs must be at least 1"),
    ("- a list\n", "mapping"),
]


@pytest.mark.parametrize("text, fragment", CONFIG_ERRORS, ids=[t.split(":")[0] for t, _ in CONFIG_ERRORS])
def test_wrong_config_files(text: str, fragment: str, tiny: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    argv = ["train", "--config", str(config), "--dataset", f"folder:{tiny}", "--out", str(tmp_path / "run")]
    assert fragment in usage_error(argv, capsys)


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "report", "explain", "serve"])
def test_missing_run_directory(command: str, tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-run"
    extra = [str(tiny / "a" / "0.png")] if command in ("predict", "explain") else []
    assert f"Run directory {missing} does not exist" in usage_error([command, str(missing), *extra], capsys)


def test_wrong_flags_in_real_subprocesses(tmp_path: Path, cache_env: dict[str, str], tiny: Path) -> None:
    assert_usage_error(cnnlab("train", "--lr", "-1", env=cache_env), "--lr must be positive")
    assert_usage_error(cnnlab("explain", str(tmp_path / "gone"), str(tiny / "a" / "0.png"), env=cache_env),
                       "does not exist")
