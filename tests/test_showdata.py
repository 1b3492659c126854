"""`cnnlab datasets show`: sample grids of a built-in and of a folder dataset, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_fmnist
from PIL import Image

from cnnlab.errors import CnnlabError, InvalidSetting
from cnnlab.insight.preview import show_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def cnnlab_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ}, cwd=cwd)


@needs_fmnist
def test_fashion_mnist_grid(tmp_path: Path) -> None:
    out = tmp_path / "grids" / "fm.png"
    result = cnnlab_cli("datasets", "show", "fashion-mnist", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    with Image.open(out) as png:
        # 10 rows of 8 images of 28 pixels, drawn at about 1 inch (100 pixels) per row
        assert png.format == "PNG" and 600 <= png.width <= 1400 and 800 <= png.height <= 1400


@needs_fmnist
def test_default_file_name_split_and_count(tmp_path: Path) -> None:
    result = cnnlab_cli("datasets", "show", "fashion-mnist", "--split", "test", "--per-class", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "fashion-mnist-samples.png") as png:
        assert png.width < 700  # three images a row, not eight


@pytest.fixture
def colour_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three classes of noisy solid-colour photos of mixed sizes; "blue" has only two."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "My Photos"
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(2 if name == "blue" else 6):
            side = 24 + 4 * i
            pixels = np.clip(np.array(rgb) + rng.integers(-20, 20, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{i}.png")
    return root


def test_colour_folder_dataset(colour_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = show_dataset(f"folder:{colour_folder}", per_class=4, progress=False)
    assert path == Path("folder-My-Photos-samples.png")  # the folder's name, made a safe file name
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    for r, g, b in COLOURS.values():  # each class's colour is in the grid
        assert (np.abs(pixels - (r, g, b)).max(axis=1) < 30).sum() > 100


def test_errors(colour_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidSetting, match="^per_class must be at least 1"):
        show_dataset(f"folder:{colour_folder}", tmp_path / "x.png", per_class=0)
    with pytest.raises(CnnlabError, match="does not exist"):
        show_dataset(f"folder:{tmp_path / 'nowhere'}", tmp_path / "x.png")
    result = cnnlab_cli("datasets", "show", "no-such-set", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:") and "no-such-set" in lines[0], result.stderr
    assert not (tmp_path / "x.png").exists()
    flagged = cnnlab_cli("datasets", "show", f"folder:{colour_folder}", "--per-class", "0",
                         "--out", str(tmp_path / "x.png"))
    assert (flagged.returncode, flagged.stderr) == (2, "cnnlab: error: --per-class must be at least 1, got 0.\n")
