"""RunDir and ModelCard: the run directory's files written and read back by their one owner."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from cnnlab.card import ModelCard
from cnnlab.errors import CnnlabError
from cnnlab.rundir import RunDir

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


def card() -> ModelCard:
    return ModelCard(architecture="lenet5", model_args={}, class_names=["ant", "bee"], in_channels=1,
                     image_size=(28, 28), mean=[0.5], std=[0.25], tta="flip", dataset="folder:/x", recipe="none",
                     cnnlab_version="0.1.0")


def test_the_card_written_by_the_old_version_round_trips_unchanged():
    data = json.loads((FIXTURE / "model.json").read_text())
    assert ModelCard.from_json(data).to_json() == data


def test_write_model_records_the_weights_hash_and_reads_back(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    written = run.write_model(state, card())
    assert len(written.weights_sha256) == 64
    assert run.read_card() == written
    assert torch.equal(run.read_weights(written)["w"], state["w"])


def test_every_file_gets_the_same_permissions_weights_included(tmp_path: Path):
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "run")
        run.write_config({"epochs": 1})
        run.start_metrics()
        run.write_model({"w": torch.zeros(2)}, card())
        run.write_summary({"test_accuracy": 0.5})
        run.write_checkpoint({"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_metrics_are_appended_and_cut_back_for_a_resume(tmp_path: Path):
    run = RunDir(tmp_path)
    run.start_metrics()
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "train_loss": 1 / epoch})
    run.keep_metrics(2)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_missing_optional_files_read_as_empty_and_a_missing_card_is_one_error(tmp_path: Path):
    run = RunDir(tmp_path)
    assert run.read_summary() == {} and run.read_config() == {} and run.read_metrics() == []
    with pytest.raises(CnnlabError, match="holds no model.json"):
        run.read_card()


@pytest.mark.parametrize("change, message", [
    ({"class_names": ["ant"]}, "lists 1 class names for 2 classes"),
    ({"tta": "rotate"}, "unknown test-time augmentation"),
    ({"image_size": [28, 0]}, "has image_size"),
])
def test_a_damaged_card_names_what_is_wrong(change, message):
    data = {**card().with_weights("0" * 64).to_json(), **change}
    with pytest.raises(CnnlabError, match=message):
        ModelCard.from_json(data, "model.json")


def test_new_weights_remove_the_files_made_from_the_old_ones(tmp_path: Path):
    """eval, reports (of any dataset), exports and explain/ belong to the weights they came from."""
    run = RunDir(tmp_path / "run")
    run.write_model({"w": torch.zeros(3)}, card())
    derived = [run.eval_path(), run.eval_path("folder:/data/photos"), run.report_path(), run.report_path("mnist"),
               run / RunDir.ONNX, run / RunDir.TORCHSCRIPT]
    for path in derived:
        path.write_text("made from the first weights")
    (run.report_figures() / "confusion.png").parent.mkdir()
    (run.report_figures() / "confusion.png").write_bytes(b"png")
    assert run.eval_path("folder:/data/photos").name == "eval-folder-photos.json"
    assert run.report_path("mnist").name == "report-mnist.html"
    run.write_model({"w": torch.zeros(3)}, card())  # the same weights again: nothing is stale
    assert all(path.exists() for path in derived)
    run.write_model({"w": torch.ones(3)}, card())
    assert not any(path.exists() for path in derived) and not run.report_figures().exists()
    assert sorted(p.name for p in run.path.iterdir()) == [RunDir.CARD, RunDir.WEIGHTS]
