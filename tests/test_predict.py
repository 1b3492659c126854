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
import threading
from pathlib import Path

import pytest
from notorch import BLOCK_TORCH

from cnnlab import Classifier
from cnnlab.deploy.predict import Backend, Counts, classify_files, expand_paths, make_backend, predict_paths
from cnnlab.errors import InvalidSetting


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
    assert "2 of 2 files could not be classified" in result.stderr


def test_the_library_reports_counts_and_names_parameters(fmnist_run, image_tree) -> None:
    """predict_paths says what happened and leaves exit statuses and flags to the CLI."""
    root, truth = image_tree
    out = io.StringIO()
    counts = predict_paths(str(fmnist_run), [sorted(truth)[0], str(root / "broken.jpg")], fmt="csv",
                           progress=False, out=out)
    assert counts == Counts(classified=1, failed=1) and counts.total == 2
    assert len(out.getvalue().strip().splitlines()) == 3  # the header and one row per file
    assert predict_paths(str(fmnist_run), [str(root / "empty.png")], progress=False, out=io.StringIO()) \
        == Counts(classified=0, failed=1)
    for kwargs, setting in (({"top_k": 0}, "top_k"), ({"batch_size": 0}, "batch_size"),
                            ({"backend": "onnx", "precision": "bf16"}, "precision")):
        with pytest.raises(InvalidSetting) as info:
            predict_paths(str(fmnist_run), [str(root)], progress=False, out=io.StringIO(), **kwargs)
        assert info.value.setting == setting and "--" not in str(info.value)


@pytest.mark.parametrize("args, fragment", [
    (["{run}", "/no/such/image.png"], "does not exist"),
    (["{run}", "{root}/*.nothing"], "holds no image files"),
    (["/no/such/run", "{root}"], "/no/such/run"),
    (["{run}", "{root}", "--top-k", "0"], "--top-k must be at least 1, got 0."),
    (["{run}", "{root}", "--batch-size", "0"], "--batch-size must be at least 1, got 0."),
])
def test_usage_errors_are_one_line(fmnist_run, image_tree, args: list[str], fragment: str) -> None:
    root, _ = image_tree
    result = cnnlab("predict", *[a.format(run=fmnist_run, root=root) for a in args])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


def test_streaming_holds_at_most_two_batches(fmnist_run, image_tree) -> None:
    """Memory stays flat: the next batch decodes while one is classified, never more at once,
    and results come out before later files are read."""
    root, truth = image_tree
    real = make_backend(str(fmnist_run), "torch")
    lock = threading.Lock()
    state = {"read": 0, "held": 0, "most_held": 0, "batches": []}

    def read(path: Path):
        image = real.read(path)
        with lock:
            state["read"] += 1
            state["held"] += 1
            state["most_held"] = max(state["most_held"], state["held"])
        return image

    def classify(images, k):
        with lock:
            state["batches"].append(len(images))
            state["held"] -= len(images)
        return real.classify(images, k)

    paths = expand_paths([str(root)])
    results = classify_files(iter(paths), Backend(read, classify), batch_size=4)
    first = next(results)
    assert state["read"] <= 8 < len(paths)  # lazy: only the first two batches decoded so far
    rest = list(results)
    assert [first.path, *[r.path for r in rest]] == [str(p) for p in paths]
    assert state["most_held"] <= 8 and max(state["batches"]) <= 4
    assert sum(state["batches"]) == len(truth)


NO_TORCH_CLI = BLOCK_TORCH + """
from cnnlab.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules), "torch was imported"
sys.exit(code)
"""


def test_onnx_backend_runs_without_torch_and_agrees(fmnist_run, image_tree, tmp_path: Path) -> None:
    root, truth = image_tree
    run = tmp_path / "run"
    shutil.copytree(fmnist_run, run)
    missing = cnnlab("predict", str(run), str(root), "--backend", "onnx")
    assert missing.returncode == 2 and "cnnlab export" in missing.stderr

    assert cnnlab("export", str(run), "--format", "onnx").returncode == 0
    result = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, "predict", str(run), str(root), "--backend", "onnx",
                             "--format", "json", "--top-k", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert "error" in rows[str(root / "broken.jpg")]
    expected = Classifier.load(run).predict(sorted(truth), top_k=2)
    for path, want in zip(sorted(truth), expected):
        got = rows[path]["predictions"]
        assert [p["label"] for p in got] == [p.label for p in want]
        assert [p["probability"] for p in got] == pytest.approx([p.probability for p in want], abs=1e-4)


def test_pil_images_with_alpha_are_composited_like_files(fmnist_run, fmnist_test_images, tmp_path: Path) -> None:
    """An RGBA image gives the same answer as a PIL image and as a file: alpha over white."""
    from PIL import Image

    gray = Image.open(fmnist_test_images[0][3]).convert("L")
    rgba = Image.merge("RGBA", (gray, gray, gray, gray.point(lambda v: 255 if v > 40 else 0)))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    clf = Classifier.load(fmnist_run)
    from_file, from_pil = clf.predict([path, rgba], top_k=3)
    assert [p.label for p in from_file] == [p.label for p in from_pil]
    assert [p.probability for p in from_file] == pytest.approx([p.probability for p in from_pil], abs=1e-6)
    dropped = clf.predict(rgba.convert("RGB"), top_k=3)[0]  # alpha thrown away: a different, black background
    assert [p.probability for p in dropped] != pytest.approx([p.probability for p in from_pil], abs=1e-3)


def test_precision_and_tta_overrides(fmnist_run, image_tree) -> None:
    root, truth = image_tree
    paths = sorted(truth)
    default = make_backend(str(fmnist_run), "torch").classify([make_backend(str(fmnist_run), "torch").read(p)
                                                               for p in paths], 1)
    torch_backend = make_backend(str(fmnist_run), "torch", precision="bf16", tta="none")
    images = [torch_backend.read(p) for p in paths]
    fast = torch_backend.classify(images, 1)
    # bf16 without flip averaging: nearly the same answers, but not the same numbers
    assert sum(a[0][0] == b[0][0] for a, b in zip(default, fast)) >= len(paths) - 2
    assert [a[0][1] for a in default] != pytest.approx([b[0][1] for b in fast], abs=1e-4)
    flip_only = make_backend(str(fmnist_run), "torch", tta="flip").classify(images, 1)
    assert [a[0][1] for a in default] == pytest.approx([b[0][1] for b in flip_only], abs=1e-6)  # model.json says flip

    result = cnnlab("predict", str(fmnist_run), str(root), "--backend", "onnx", "--precision", "bf16")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
