"""`cnnlab evaluate` / `report` on another dataset: classes matched to the model's by name (another
order is mapped, a subset is scored, an unknown class is refused), results in their own files;
and the files derived from a run's weights (eval, report, ONNX) tied to those weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_fmnist
from PIL import Image

import cnnlab
from cnnlab.cli import main
from cnnlab.rundir import RunDir

# Three Fashion-MNIST classes a small network tells apart at once, given to the model in an order
# that is not the sorted order a folder dataset gets: mapping by position would score nonsense.
PICKED = {1: "trouser", 8: "bag", 7: "sneaker"}  # Fashion-MNIST label -> our class name
MODEL_ORDER = ["trouser", "sneaker", "bag"]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> images (N, 28, 28) uint8 of that class: the first 300 training images of each for
    training, and the first 100 test images of each for testing."""
    from cnnlab.data.load import load_dataset

    bundle = load_dataset("fashion-mnist", val_split=0, progress=False)
    out = {}
    for split, data, n in (("train", bundle.train, 300), ("test", bundle.test, 100)):
        labels = data.labels.numpy()
        for label, name in PICKED.items():
            out[f"{split}/{name}"] = data.images[np.flatnonzero(labels == label)[:n], 0].numpy()
    return out


@pytest.fixture(scope="module")
def run(three_classes: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        images = np.concatenate([three_classes[f"{split}/{name}"] for name in MODEL_ORDER])
        labels = np.concatenate([np.full(len(three_classes[f"{split}/{name}"]), i) for i, name in enumerate(MODEL_ORDER)])
        return images, labels

    out = tmp_path_factory.mktemp("classes") / "run"
    return cnnlab.train(data=arrays("train"), test_data=arrays("test"), class_names=MODEL_ORDER, epochs=3,
                        model_args={"widths": [8, 16, 32]}, out=str(out), progress=False)


def write_folder(root: Path, three_classes: dict, names: list[str]) -> Path:
    """A folder dataset with train/ and test/ class folders of PNG files."""
    for split in ("train", "test"):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            source = three_classes.get(f"{split}/{name}")
            if source is None:  # a class the model never saw: any images will do
                source = 255 - three_classes[f"{split}/bag"]
            for i, image in enumerate(source[:40]):
                Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
    return root


@needs_fmnist
def test_another_class_order_is_mapped_by_name_into_its_own_file(run: Path, three_classes: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    own = json.loads((run / "eval.json").read_text())
    assert own["accuracy"] > 0.9
    before = (run / "eval.json").read_bytes()
    capsys.readouterr()

    other = write_folder(tmp_path / "shoes", three_classes, MODEL_ORDER)  # folders sort: bag, sneaker, trouser
    assert main(["evaluate", str(run), "--dataset", f"folder:{other}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lists the model's classes in another order; its labels were matched to the model's by class name" in out
    path = run / "eval-folder-shoes.json"
    assert f"wrote {path}" in out
    report = json.loads(path.read_text())
    # the same images as the run's own test split (40 of each class): the same kind of accuracy,
    # where position-matched labels would put most images in the wrong class
    assert report["accuracy"] > 0.9 and report["images"] == 120
    assert [row["class"] for row in report["per_class"]] == MODEL_ORDER
    assert [row["support"] for row in report["per_class"]] == [40, 40, 40]
    assert (run / "eval.json").read_bytes() == before  # the run's own results are left alone


@needs_fmnist
def test_a_subset_of_the_classes_is_scored_and_unknown_classes_are_refused(run: Path, three_classes: dict,
                                                                          tmp_path: Path) -> None:
    subset = write_folder(tmp_path / "two", three_classes, ["bag", "trouser"])
    report = cnnlab.evaluate_run(run, dataset=f"folder:{subset}", progress=False)
    assert report["accuracy"] > 0.9
    assert {row["class"]: row["support"] for row in report["per_class"]} == {"trouser": 40, "sneaker": 0, "bag": 40}

    unknown = write_folder(tmp_path / "coats", three_classes, ["bag", "coat", "sneaker"])
    result = subprocess.run([sys.executable, "-m", "cnnlab", "evaluate", str(run), "--dataset", f"folder:{unknown}",
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cnnlab: error: folder:{unknown} has classes the model was not trained on (coat); the model knows "
        "trouser, sneaker, bag: score it on data with those classes."]
    assert not list(run.glob("eval-folder-coats*"))


@needs_fmnist
def test_report_on_another_dataset_writes_its_own_page(run: Path, three_classes: dict, tmp_path: Path) -> None:
    other = write_folder(tmp_path / "shoes", three_classes, MODEL_ORDER)
    assert main(["report", str(run), "--dataset", f"folder:{other}", "--no-progress"]) == 0
    page = (run / "report-folder-shoes.html").read_text()
    assert not (run / "report.html").exists()
    assert (run / "report-folder-shoes" / "confusion.png").is_file()
    assert "eval-folder-shoes.json" in page
    sha = RunDir(run).read_card().weights_sha256
    assert f"<meta name='cnnlab-weights-sha256' content='{sha}'>" in page


@needs_fmnist
def test_files_made_from_other_weights_are_refused_then_remade(run: Path, tmp_path: Path, capsys) -> None:
    """model.onnx exported before the run's weights were replaced (here: another run's model files
    copied in) is refused in one line by the torch-free runtime and predict --backend onnx."""
    import shutil

    from cnnlab.deploy.onnx_runtime import OnnxClassifier

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["export", str(copy), "--format", "onnx"]) == 0
    assert main(["evaluate", str(copy), "--no-progress"]) == 0
    assert json.loads((copy / "eval.json").read_text())["weights_sha256"] == RunDir(copy).read_card().weights_sha256
    # new weights with the same architecture: the run's own model trained one more epoch elsewhere
    other = cnnlab.train(init_from=str(run), data=_arrays(run), class_names=MODEL_ORDER,
                         epochs=1, model_args={"widths": [8, 16, 32]}, out=str(tmp_path / "other"), progress=False)
    for name in (RunDir.WEIGHTS, RunDir.CARD):
        shutil.copy(other / name, copy / name)
    message = (f"model.onnx was exported from other weights than {copy / 'model.json'}'s; run `cnnlab export "
               f"{copy}` again.")
    with pytest.raises(cnnlab.CnnlabError) as refused:
        OnnxClassifier.load(copy)
    assert str(refused.value) == message
    image = tmp_path / "shoe.png"
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(image)
    capsys.readouterr()
    assert main(["predict", str(copy), str(image), "--backend", "onnx", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"cnnlab: error: {message}"
    # exported again, it serves the new weights
    assert main(["export", str(copy), "--format", "onnx"]) == 0
    assert OnnxClassifier.load(copy).card.weights_sha256 == RunDir(copy).read_card().weights_sha256


def _arrays(run: Path) -> tuple[np.ndarray, np.ndarray]:
    from cnnlab.data.memory import load_saved_split

    test = load_saved_split(run / RunDir.TEST_DATA, "kept").test
    return test.images[:, 0].numpy(), test.labels.numpy()
