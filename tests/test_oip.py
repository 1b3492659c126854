"""The Open Inference Protocol v2 routes of `cnnlab serve`, called by a standard client library
(tritonclient's HTTP client) against a real server on loopback: health, metadata, readiness,
inference from encoded images (binary and base64 JSON) and from pixel tensors (UINT8 NHWC and
NCHW, FP32), and the errors the protocol specifies."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from serving import running_server

from cnnlab import Classifier

http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'cnnlab[test]')")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(fmnist_run: Path) -> Iterator[str]:
    with running_server(fmnist_run, "--max-wait-ms", "20") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator["http.InferenceServerClient"]:
    c = http.InferenceServerClient(server.split("//", 1)[1].rstrip("/"), network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(fmnist_run: Path, fmnist_test_images: tuple[list[Path], list[str]]) -> tuple[np.ndarray, list[str]]:
    """Classifier's probabilities (N, classes) for the first 8 test images, and its class names."""
    classifier = Classifier.load(fmnist_run)
    paths = fmnist_test_images[0][:8]
    probabilities = np.array([[p.probability for p in sorted(ranked, key=lambda p: p.index)]
                              for ranked in classifier.predict(paths, top_k=len(classifier.class_names))])
    return probabilities, classifier.class_names


def pixels(fmnist_test_images: tuple[list[Path], list[str]], n: int = 8) -> np.ndarray:
    """The first n test images as uint8 (N, H, W, 1), decoded from their PNG files."""
    from PIL import Image
    return np.stack([np.asarray(Image.open(p))[..., None] for p in fmnist_test_images[0][:n]])


def check(result: "http.InferResult", reference: tuple[np.ndarray, list[str]], k: int) -> None:
    expected, names = reference
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == expected.shape and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    labels = result.as_numpy("labels")
    assert labels.shape == (len(expected), k)
    top = np.argsort(-expected, axis=1, kind="stable")[:, :k]
    assert [[str(x, "utf-8") if isinstance(x, bytes) else x for x in row] for row in labels.tolist()] == \
        [[names[i] for i in row] for row in top]


def test_health_metadata_and_readiness(client, fmnist_run: Path):
    name = fmnist_run.name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, model_version="1")
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "cnnlab" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("images", "BYTES", (-1,)), ("pixels", "UINT8", (-1, 28, 28, 1))}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]} == {
        ("probabilities", "FP32", (-1, 10)), ("labels", "BYTES", (-1, -1))}


def test_encoded_images_as_binary_bytes(client, fmnist_run, fmnist_test_images, reference):
    files = np.array([p.read_bytes() for p in fmnist_test_images[0][:8]], dtype=object)
    tensor = http.InferInput("images", [8], "BYTES")
    tensor.set_data_from_numpy(files)  # the client's default: the binary tensor data extension
    check(client.infer(fmnist_run.name, [tensor]), reference, k=5)


def test_encoded_images_as_base64_in_json(client, fmnist_run, fmnist_test_images, reference):
    files = np.array([base64.b64encode(p.read_bytes()) for p in fmnist_test_images[0][:8]], dtype=object)
    tensor = http.InferInput("images", [8], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=False)
    outputs = [http.InferRequestedOutput("probabilities", binary_data=False),
               http.InferRequestedOutput("labels", binary_data=False)]
    check(client.infer(fmnist_run.name, [tensor], outputs=outputs, parameters={"top_k": 3}), reference, k=3)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_uint8_pixel_tensors(client, fmnist_run, fmnist_test_images, reference, layout):
    array = pixels(fmnist_test_images)
    if layout == "NCHW":
        array = np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    tensor = http.InferInput("pixels", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    check(client.infer(fmnist_run.name, [tensor], model_version="1"), reference, k=5)


def test_fp32_pixel_tensors_in_json(client, fmnist_run, fmnist_test_images, reference):
    array = (pixels(fmnist_test_images) / 255).astype(np.float32)
    tensor = http.InferInput("pixels", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=False)
    outputs = [http.InferRequestedOutput("probabilities", binary_data=False),
               http.InferRequestedOutput("labels", binary_data=True)]
    check(client.infer(fmnist_run.name, [tensor], outputs=outputs), reference, k=5)


def test_one_output_only(client, fmnist_run, fmnist_test_images):
    tensor = http.InferInput("pixels", [1, 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(pixels(fmnist_test_images, 1))
    result = client.infer(fmnist_run.name, [tensor], outputs=[http.InferRequestedOutput("labels")],
                          parameters={"top_k": 2}).get_response()
    assert [o["name"] for o in result["outputs"]] == ["labels"]


def test_protocol_errors(client, server, fmnist_run, fmnist_test_images):
    tensor = http.InferInput("pixels", [1, 28, 28, 1], "UINT8")
    tensor.set_data_from_numpy(pixels(fmnist_test_images, 1))
    with pytest.raises(InferenceServerException, match="No model named 'nope'"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.infer(fmnist_run.name, [tensor], model_version="2")
    wrong = http.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=r"takes \[N, 28, 28, 1\] or \[N, 1, 28, 28\]"):
        client.infer(fmnist_run.name, [wrong])
    with pytest.raises(InferenceServerException, match="No output named 'logits'"):
        client.infer(fmnist_run.name, [tensor], outputs=[http.InferRequestedOutput("logits")])

    # hand-written bodies for what a client library would not send; every error is {"error": "..."}
    url = f"{server}/v2/models/{fmnist_run.name}/infer"
    cases = [
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}, "datatype INT64"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]},
         "not valid base64"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                      "data": [base64.b64encode(b"no image").decode()]}]}, "not an image"),
        ({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}, "holds 1 element."),
        ({"inputs": [{"name": "pixels", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [1, 2]}]},
         "does not hold 784 UINT8 values"),
        ({"inputs": []}, "The request is invalid"),
    ]
    for body, message in cases:
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code in (400, 413, 415), (body, answer.text)
        assert message in answer.json()["error"], (body, answer.text)
    broken = httpx.post(url, content=b'{"inputs": [', headers={"Content-Type": "application/json"}, timeout=60)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    short = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"}, timeout=60)
    assert short.status_code == 400 and "Inference-Header-Content-Length" in short.json()["error"]


def test_the_v1_api_is_unchanged_beside_it(server, fmnist_test_images):
    path = fmnist_test_images[0][0]
    answer = httpx.post(f"{server}/v1/predict", files={"files": (path.name, path.read_bytes(), "image/png")},
                        timeout=60)
    assert answer.status_code == 200 and answer.json()["predictions"][0]["filename"] == path.name
