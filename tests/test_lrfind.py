"""The learning-rate range test: the suggestion rule on curves with a known answer, and a
real sweep on Fashion-MNIST whose suggestion then trains."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_fmnist
from PIL import Image

import cnnlab
from cnnlab.errors import CnnlabError
from cnnlab.training.config import make_config
from cnnlab.training.lrfind import lr_find, suggest_lr

LRS = np.logspace(-4, 1, 100)  # the default sweep: 1e-4 to 10 in 100 steps
DECADES = np.log10(LRS)


def _valley(steepest_at: float = 1e-2) -> np.ndarray:
    """A plateau at 2.3, a sigmoid fall to 0.5 steepest at `steepest_at`, a climb above lr 1."""
    fall = 1.8 / (1 + np.exp(-(DECADES - np.log10(steepest_at)) / 0.3))
    return 2.3 - fall + 3 * np.clip(DECADES, 0, None) ** 2


def _spike(at: int, height: float) -> np.ndarray:
    """A bad batch as the smoothed loss shows it: a jump, then an exponential decay."""
    steps = np.arange(len(LRS)) - at
    return np.where(steps >= 0, height * np.exp(-np.clip(steps, 0, None) / 5), 0.0)


def _near(value: float, want: float, decades: float = 0.06) -> bool:
    return abs(math.log10(value / want)) <= decades


def test_suggestion_is_the_steepest_fall() -> None:
    # the minimum is at lr 1, so the cap (0.1) is above the steepest point and does not bind
    assert _near(suggest_lr(LRS, _valley()), 1e-2)


def test_early_spikes_are_ignored() -> None:
    spiked = _valley() + _spike(3, 3.0) + _spike(15, 1.5)  # in the first tenth, and after it
    naive = LRS[np.argmin(np.gradient(spiked, DECADES))]
    assert naive < 1e-3  # the trap is real: the recovery from a spike is the steepest fall
    assert _near(suggest_lr(LRS, spiked), 1e-2)


def test_suggestion_is_at_most_a_tenth_of_the_minimum() -> None:
    cliff = _valley(steepest_at=0.5)  # the fall ends at the minimum's door
    lowest = LRS[np.argmin(cliff)]
    assert suggest_lr(LRS, cliff) == pytest.approx(lowest / 10)


def test_a_loss_that_only_rises_suggests_the_lowest_rate() -> None:
    rising = 2.3 + np.linspace(0, 3, len(LRS))
    assert suggest_lr(LRS, rising) == LRS[0]
    with pytest.raises(CnnlabError, match="at least 3 steps"):
        suggest_lr(LRS[:2], rising[:2])


@needs_fmnist
def test_lr_find_on_fashion_mnist_then_train_at_the_suggestion(tmp_path: Path) -> None:
    config = make_config(dataset="fashion-mnist", limit_train=2000, batch_size=64,
                         model_args={"widths": [16, 32, 64]}, progress=False)
    result = lr_find(config, min_lr=1e-4, max_lr=10.0, steps=40, out=tmp_path / "lr.png")
    assert 1e-4 <= result.suggestion <= 10.0
    assert len(result.lrs) == len(result.losses) <= 40
    assert np.allclose(np.diff(np.log(result.lrs)), math.log(1e5) / 39)  # exponential growth
    assert len(result.lrs) == 40 or result.losses[-1] > 4 * min(result.losses)  # stopped where it diverged
    with Image.open(result.plot) as png:
        assert png.format == "PNG"
    assert json.loads((tmp_path / "lr.json").read_text())["suggestion"] == result.suggestion

    run = cnnlab.train(config, lr=result.suggestion, epochs=2, out=str(tmp_path / "run"))
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] and losses[-1] < math.log(10) - 0.8  # from chance (2.30) to well below


def cnnlab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ})


@needs_fmnist
def test_lr_find_cli_prints_the_suggestion(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = cnnlab_cli("lr-find", "--limit-train", "2000", "--steps", "30", "--out", str(out), "--batch-size", "64",
                        "--model-arg", "widths=[8,16,32]", "--no-progress")
    assert result.returncode == 0, result.stderr
    suggestion = json.loads((out / "lr_find.json").read_text())["suggestion"]
    assert f"suggested learning rate: {suggestion:.3g} per 256 images" in result.stdout
    assert (out / "lr_find.png").is_file()


def test_lr_find_cli_bad_range_is_one_line() -> None:
    result = cnnlab_cli("lr-find", "--min-lr", "1", "--max-lr", "0.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:") and "--min-lr" in lines[0], result.stderr
