"""`train --tensorboard`: event files that agree with metrics.jsonl, and a clear error without the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import needs_fmnist

import cnnlab
from cnnlab.errors import CnnlabError

TINY = dict(dataset="fashion-mnist", limit_train=1000, val_split=0.1, epochs=2, batch_size=64,
            model_args={"widths": [8, 16, 32]}, progress=False)


@needs_fmnist
def test_event_files_hold_the_metrics_of_every_epoch(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = cnnlab.train(**TINY, tensorboard=True, eval_test=True, out=str(tmp_path / "run"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag, key in (("loss/train", "train_loss"), ("accuracy/val", "val_accuracy"),
                     ("accuracy/test", "test_accuracy"), ("optimizer/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["epoch"] for r in records] == [1, 2]
        # event files store float32: equal to metrics.jsonl's float64 up to that rounding
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6, abs=1e-9)
    assert "accuracy/train" in events.Tags()["scalars"] and "speed/images_per_second" in events.Tags()["scalars"]


def test_missing_tensorboard_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(CnnlabError, match="cnnlab\\[tensorboard\\]"):
        cnnlab.train(**TINY, tensorboard=True, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@needs_fmnist
def test_no_event_files_unless_asked(tmp_path: Path) -> None:
    run = cnnlab.train(**{**TINY, "epochs": 1}, out=str(tmp_path / "run"))
    assert not (run / "tensorboard").exists()
