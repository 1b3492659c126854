"""Run directories written by cnnlab 0.1.0 (before the package was reorganised) still load.

tests/fixtures/run-0.1.0 was written by `cnnlab train --recipe fast --limit-train 3000 --epochs 2
--model-arg widths=[8,16,32] --model-arg stem=8` at commit cd3bf59, files and permissions as that
version left them (model.safetensors owner-only). Every command that reads a run directory reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import needs_fmnist
from serving import running_server

from cnnlab.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of the fixture, so that commands writing into the run directory leave it as committed."""
    run = tmp_path / "run-0.1.0"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_fixture_is_what_the_old_version_wrote():
    meta = json.loads((FIXTURE / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["cnnlab_version"] == "0.1.0"
    assert meta["architecture"] == "fastnet" and meta["model_args"] == {"widths": [8, 16, 32], "stem": 8}
    assert {p.name for p in FIXTURE.iterdir()} == {"model.json", "model.safetensors", "config.yaml",
                                                   "metrics.jsonl", "summary.json", "checkpoint.pt"}


@needs_fmnist
def test_evaluate_reproduces_the_recorded_test_accuracy(old_run, capsys):
    assert main(["evaluate", str(old_run), "--no-progress"]) == 0
    report = json.loads((old_run / "eval.json").read_text())
    summary = json.loads((old_run / "summary.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert "T-shirt/top" in capsys.readouterr().out


@needs_fmnist
def test_predict_with_torch_and_with_the_exported_onnx_agree(old_run, fmnist_test_images, capsys):
    import cnnlab

    paths, _ = fmnist_test_images
    expected = [row[0].label for row in cnnlab.Classifier.load(old_run).predict(paths[:16])]
    assert main(["predict", str(old_run), *map(str, paths[:16]), "--format", "json", "--no-progress"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    assert [row["predictions"][0]["label"] for row in torch_rows] == expected

    assert main(["export", str(old_run)]) == 0
    assert (old_run / "model.onnx").is_file()
    capsys.readouterr()
    assert main(["predict", str(old_run), *map(str, paths[:16]), "--backend", "onnx", "--format", "json",
                 "--no-progress"]) == 0
    onnx_rows = json.loads(capsys.readouterr().out)
    assert [row["predictions"][0]["label"] for row in onnx_rows] == expected


@needs_fmnist
def test_serve_reports_the_old_model_card_and_classifies(old_run, fmnist_test_images):
    meta = json.loads((old_run / "model.json").read_text())
    summary = json.loads((old_run / "summary.json").read_text())
    paths, _ = fmnist_test_images
    with running_server(old_run) as url:
        card = httpx.get(f"{url}/v1/model").json()
        assert card["weights_sha256"] == meta["weights_sha256"]
        assert card["class_names"] == meta["class_names"] and card["tta"] == "flip"
        assert card["test_accuracy"] == summary["test_accuracy"]
        with open(paths[0], "rb") as fh:
            answer = httpx.post(f"{url}/v1/predict", files={"file": (paths[0].name, fh, "image/png")}).json()
        assert answer["predictions"][0]["predictions"][0]["label"] in meta["class_names"]


@needs_fmnist
def test_report_and_explain_read_it(old_run, fmnist_test_images, capsys):
    paths, _ = fmnist_test_images
    assert main(["report", str(old_run), "--no-progress"]) == 0
    assert (old_run / "report.html").is_file()
    assert main(["explain", str(old_run), str(paths[0]), "--out", str(old_run / "explain")]) == 0
    assert list((old_run / "explain").glob("*.png"))


def test_resuming_the_finished_run_has_nothing_to_do(old_run, capsys):
    before = (old_run / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(old_run), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (old_run / "model.safetensors").read_bytes() == before


@needs_fmnist
def test_its_checkpoint_restores_into_the_training_state(old_run, capsys):
    """Without summary.json the run looks interrupted after its last epoch: resuming loads the old
    checkpoint.pt and finishes with exactly the weights and test accuracy the old version saved."""
    weights = (old_run / "model.safetensors").read_bytes()
    summary = json.loads((old_run / "summary.json").read_text())
    (old_run / "summary.json").unlink()
    assert main(["train", "--resume", str(old_run), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (old_run / "model.safetensors").read_bytes() == weights
    assert json.loads((old_run / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
