"""The self-contained ONNX export (`--with-preprocessing`: uint8 images in, probabilities out) run
unchanged by onnxruntime and by OpenCV's DNN module, against `cnnlab predict` on every test image;
and the Triton model repository, parsed with Triton's own model-configuration schema."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cnnlab.deploy.onnx_runtime import OnnxClassifier
from cnnlab.errors import CnnlabError


def cnnlab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(fmnist_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the trained run, exported self-contained in both layouts and with a Triton repository."""
    run = Path(shutil.copytree(fmnist_run, tmp_path_factory.mktemp("full") / "run"))
    for layout in ("nhwc", "nchw"):
        args = ["export", str(run), "--with-preprocessing", "--layout", layout, "--out", str(run / f"{layout}.onnx")]
        if layout == "nhwc":
            args += ["--triton", str(run / "triton")]
        result = cnnlab_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "max |probability difference|" in result.stdout
    return run


@pytest.fixture(scope="module")
def predicted(run: Path, fmnist_test_images: tuple[list[Path], list[str]]) -> dict[str, tuple[str, float]]:
    """`cnnlab predict`'s (PyTorch's) top class and probability for every test image, by file name."""
    folder = fmnist_test_images[0][0].parent
    result = cnnlab_cli("predict", str(run), str(folder), "--format", "csv", "--no-progress")
    assert result.returncode == 0, result.stderr
    return {Path(row["path"]).name: (row["label_1"], float(row["probability_1"]))
            for row in csv.DictReader(io.StringIO(result.stdout))}


def images(paths: list[Path]) -> np.ndarray:
    """The PNG files as one uint8 (N, H, W, C) array, as an application would read them."""
    return np.stack([np.asarray(Image.open(p).convert("L"))[..., None] for p in paths])


def check_agrees(probabilities: np.ndarray, paths: list[Path], names: list[str],
                 predicted: dict[str, tuple[str, float]]) -> None:
    assert probabilities.shape == (len(paths), len(names)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    for path, row in zip(paths, probabilities):
        label, probability = predicted[path.name]
        assert names[int(row.argmax())] == label, path.name
        assert row.max() == pytest.approx(probability, abs=1e-5)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_onnxruntime_runs_it_as_it_is(run, layout, fmnist_test_images, predicted):
    paths = fmnist_test_images[0]
    session = ort.InferenceSession(str(run / f"{layout}.onnx"), providers=["CPUExecutionProvider"])
    [graph_input], [graph_output] = session.get_inputs(), session.get_outputs()
    assert graph_input.type == "tensor(uint8)" and graph_output.name == "probabilities"
    assert graph_input.shape[1:] == ([28, 28, 1] if layout == "nhwc" else [1, 28, 28])
    batch = images(paths) if layout == "nhwc" else np.ascontiguousarray(images(paths).transpose(0, 3, 1, 2))
    names = OnnxClassifier.load(run / f"{layout}.onnx").class_names
    check_agrees(session.run(None, {graph_input.name: batch})[0], paths, names, predicted)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_opencv_dnn_runs_it_as_it_is(run, layout, fmnist_test_images, predicted):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed (pip install 'cnnlab[test]')")
    paths = fmnist_test_images[0]
    net = cv2.dnn.readNetFromONNX(str(run / f"{layout}.onnx"))
    batch = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[..., None] for p in paths])  # OpenCV's own decoder
    net.setInput(batch if layout == "nhwc" else np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    names = OnnxClassifier.load(run / f"{layout}.onnx").class_names
    check_agrees(np.asarray(net.forward(), np.float32), paths, names, predicted)


def test_predict_backend_onnx_reads_it(run, fmnist_test_images, predicted):
    folder = fmnist_test_images[0][0].parent
    result = cnnlab_cli("predict", str(run / "nhwc.onnx"), str(folder), "--backend", "onnx", "--format", "csv",
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(predicted)
    for row in rows:
        label, probability = predicted[Path(row["path"]).name]
        assert row["label_1"] == label and float(row["probability_1"]) == pytest.approx(probability, abs=1e-5)


def test_its_built_in_tta_cannot_be_swapped(run, fmnist_test_images):
    classifier = OnnxClassifier.load(run / "nhwc.onnx")
    assert classifier.self_contained and classifier.tta == "flip"
    classifier.tta = "none"
    with pytest.raises(CnnlabError, match="built in"):
        classifier.predict(fmnist_test_images[0][0])


def test_the_triton_repository_parses_with_tritons_schema(run):
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] is not installed (pip install 'cnnlab[test]')")
    from google.protobuf import text_format

    folder = run / "triton" / run.name
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config.ModelConfig())
    assert config.name == run.name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size >= 1 and config.dynamic_batching.max_queue_delay_microseconds > 0
    [graph_input], [graph_output] = config.input, config.output
    assert (graph_input.name, list(graph_input.dims)) == ("images", [28, 28, 1])
    assert graph_input.data_type == model_config.TYPE_UINT8 and graph_output.data_type == model_config.TYPE_FP32
    assert (graph_output.name, list(graph_output.dims)) == ("probabilities", [10])
    names = (folder / graph_output.label_filename).read_text().splitlines()
    assert names == OnnxClassifier.load(run / "nhwc.onnx").class_names
    # the model file Triton would load is the checked export, and its tensors match the configuration
    assert (folder / "1" / "model.onnx").read_bytes() == (run / "nhwc.onnx").read_bytes()
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == graph_input.name and session.get_outputs()[0].name == graph_output.name


def test_preprocessing_is_for_onnx_only(run):
    result = cnnlab_cli("export", str(run), "--format", "torchscript", "--with-preprocessing")
    assert result.returncode == 2
    assert result.stderr.strip() == ("cnnlab: error: Preprocessing in the graph and Triton repositories are for "
                                     "ONNX: use --format onnx.")
