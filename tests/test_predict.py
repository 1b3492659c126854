"""`cnnlab predict` on real Fashion-MNIST images, in real subprocesses: formats, folders, globs,
unreadable files, exit codes, and batch-by-batch streaming."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab import Classifier
from cnnlab.predict import Backend, classify_files, expand_paths, make_backend


def cnnlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CNNLAB_DATA": ""})


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory, fmnist_test_images) -> tuple[Path, dict[str, str]]:
    """20 real test images in a folder with a nested sub-folder, a hidden file, a non-image
    file with an image extension, and an empty one; returns the folder and path -> true label."""
    paths, labels = fmnist_test_images
    root = tmp_path_factory.mktemp("predict-tree")
    truth = {}
    for i, (path, label) in enumerate(zip(paths[:20], labels[:20])):
        target = root / ("nested/deeper" if i % 3 == 0 else "") / f"image {i:02d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        truth[str(target)] = label
    (root / ".hidden.png").write_bytes(paths[0].read_bytes())
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    (root / "broken.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "empty.png").write_bytes(b"")
    return root, truth


def test_folder_is_walked_recursively_and_bad_files_get_their_own_rows(fmnist_run, image_tree) -> None:
    root, truth = image_tree
    result = cnnlab("predict", str(fmnist_run), str(root), "--format", "json", "--top-k", "3", "--batch-size", "7")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_path = {row["path"]: row for row in rows}
    assert set(by_path) == set(truth) | {str(root / "broken.jpg"), str(root / "empty.png")}
    assert "not a readable image" in by_path[str(root / "broken.jpg")]["error"]
    assert "error" in by_path[str(root / "empty.png")]
    assert "2 of 22 files could not be classified" in result.stderr

    expected = Classifier.load(fmnist_run).predict(sorted(truth), top_k=3)
    for path, want in zip(sorted(truth), expected):
        got = by_path[path]["predictions"]
        assert [p["label"] for p in got] == [p.label for p in want]
        assert [p["probability"] for p in got] == pytest.approx([p.probability for p in want], abs=1e-5)
        assert got[0]["probability"] >= got[1]["probability"] >= got[2]["probability"]
    # the model is real: most of these real test images are classified correctly
    correct = sum(by_path[p]["predictions"][0]["label"] == label for p, label in truth.items())
    assert correct >= 14


def test_table_and_csv_formats_and_globs(fmnist_run, image_tree) -> None:
    root, truth = image_tree
    table = cnnlab("predict", str(fmnist_run), str(root / "nested" / "**" / "*.png"), "--no-progress")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    nested = sorted(p for p in truth if "nested" in p)
    assert [line.split("\t")[0] for line in lines] == nested
    assert all(line.split("\t")[1].split()[-1].replace(".", "").isdigit() for line in lines)

    result = cnnlab("predict", str(fmnist_run), nested[0], str(root / "broken.jpg"), "--format", "csv",
                    "--top-k", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "label_1", "probability_1", "label_2", "probability_2", "error"]
    assert rows[0]["path"] == nested[0] and rows[0]["label_1"] and not rows[0]["error"]
    assert 0 < float(rows[0]["probability_2"]) <= float(rows[0]["probability_1"]) <= 1
    assert rows[1]["label_1"] == "" and "not a readable image" in rows[1]["error"]


def test_exit_status_when_nothing_could_be_classified(fmnist_run, image_tree) -> None:
    root, _ = image_tree
    result = cnnlab("predict", str(fmnist_run), str(root / "broken.jpg"), str(root / "empty.png"), "--no-progress")
    assert result.returncode == 1
    assert result.stdout.count("ERROR") == 2


@pytest.mark.parametrize("args, fragment", [
    (["{run}", "/no/such/image.png"], "does not exist"),
    (["{run}", "{root}/*.nothing"], "holds no image files"),
    (["/no/such/run", "{root}"], "/no/such/run"),
    (["{run}", "{root}", "--top-k", "0"], "--top-k"),
])
def test_usage_errors_are_one_line(fmnist_run, image_tree, args: list[str], fragment: str) -> None:
    root, _ = image_tree
    result = cnnlab("predict", *[a.format(run=fmnist_run, root=root) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


def test_streaming_decodes_one_batch_at_a_time(fmnist_run, image_tree) -> None:
    """Memory stays flat: results come out batch by batch, never more than batch_size images held."""
    root, truth = image_tree
    real = make_backend(str(fmnist_run), "torch")
    state = {"held": 0, "most_held": 0, "batches": []}

    def read(path: Path):
        image = real.read(path)
        state["held"] += 1
        state["most_held"] = max(state["most_held"], state["held"])
        return image

    def classify(images, k):
        state["batches"].append(len(images))
        state["held"] -= len(images)
        return real.classify(images, k)

    paths = expand_paths([str(root)])
    results = classify_files(iter(paths), Backend(read, classify, real.unreadable), batch_size=4)
    first = next(results)
    assert len(state["batches"]) <= 1  # lazy: nothing read beyond the first batch yet
    rest = list(results)
    assert len(rest) + 1 == len(paths)
    assert state["most_held"] <= 4 and max(state["batches"]) <= 4
    assert first.path == str(paths[0])
