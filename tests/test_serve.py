"""`cnnlab serve` as a real server in a subprocess: predictions against `Classifier.predict`,
the model card, every refusal (413, 415, 422, 401), API keys, and micro-batching."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from serving import png_header, running_server

from cnnlab import Classifier

MAX_BYTES = 5_000  # per image: Fashion-MNIST PNGs are under 1 kB
MAX_PIXELS = 1_000_000
KEY = "correct-horse-battery-staple"


# --- fixtures and shared checks -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(fmnist_run: Path) -> Iterator[str]:
    with running_server(fmnist_run, "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS),
                        "--max-wait-ms", "50") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(fmnist_run: Path, fmnist_test_images: tuple[list[Path], list[str]]) -> dict[str, dict[str, float]]:
    """Classifier.predict's probability of every class for each test image, by file name."""
    classifier = Classifier.load(fmnist_run)
    paths, _ = fmnist_test_images
    predictions = classifier.predict(paths, top_k=len(classifier.class_names))
    return {path.name: {p.label: p.probability for p in ranked} for path, ranked in zip(paths, predictions)}


def png_file(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def assert_matches(result: dict[str, Any], probabilities: dict[str, float], k: int) -> None:
    """One image's top-k from the server agrees with Classifier.predict (batching changes only rounding)."""
    scores = result["predictions"]
    assert len(scores) == k
    assert scores[0]["label"] == max(probabilities, key=probabilities.get)
    assert [s["probability"] for s in scores] == sorted((s["probability"] for s in scores), reverse=True)
    for score in scores:
        assert score["probability"] == pytest.approx(probabilities[score["label"]], abs=1e-5)


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and fragment in body["error"], body
    assert "Traceback" not in response.text


def blank_png(width: int, height: int) -> bytes:
    """A real image, all white, that compresses to a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, "PNG")
    return buffer.getvalue()


def cnnlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "CNNLAB_API_KEY"})


# --- predictions -------------------------------------------------------------------------------------

def test_one_file_gets_the_classifiers_top_5(client, fmnist_test_images, expected):
    path = fmnist_test_images[0][0]
    response = client.post("/v1/predict", files={"files": png_file(path)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "run" and len(body["predictions"]) == 1
    assert body["predictions"][0]["filename"] == path.name
    assert_matches(body["predictions"][0], expected[path.name], k=5)


def test_many_files_keep_their_order_and_names(client, fmnist_test_images, expected):
    paths = fmnist_test_images[0][:8]
    files = [("files", png_file(p)) for p in paths[:7]] + [("file", png_file(paths[7]))]  # 'file' works too
    response = client.post("/v1/predict", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    results = response.json()["predictions"]
    assert [r["filename"] for r in results] == [p.name for p in paths]
    for path, result in zip(paths, results):
        assert_matches(result, expected[path.name], k=3)


def test_base64_json_with_and_without_data_url(client, fmnist_test_images, expected):
    paths = fmnist_test_images[0][8:11]
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    encoded[1] = "data:image/png;base64," + encoded[1]
    response = client.post("/v1/predict", json={"images": encoded, "top_k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["predictions"]
    assert [r["filename"] for r in results] == [None] * 3
    for path, result in zip(paths, results):
        assert_matches(result, expected[path.name], k=2)


def test_top_k_is_capped_at_the_number_of_classes(client, fmnist_test_images):
    response = client.post("/v1/predict", files={"files": png_file(fmnist_test_images[0][0])}, params={"top_k": 50})
    scores = response.json()["predictions"][0]["predictions"]
    assert len(scores) == 10 and sum(s["probability"] for s in scores) == pytest.approx(1, abs=1e-4)
    assert sorted(s["index"] for s in scores) == list(range(10))


def test_concurrent_requests_share_forward_passes(client, fmnist_test_images, expected):
    paths = fmnist_test_images[0][:32]
    files = [png_file(p) for p in paths]
    before = client.get("/v1/stats").json()
    start = threading.Barrier(len(files))

    def post(file: tuple[str, bytes, str]) -> httpx.Response:
        start.wait()
        return client.post("/v1/predict", files={"files": file})

    with ThreadPoolExecutor(len(files)) as pool:
        responses = list(pool.map(post, files))
    after = client.get("/v1/stats").json()
    for path, response in zip(paths, responses):
        assert response.status_code == 200, response.text
        assert_matches(response.json()["predictions"][0], expected[path.name], k=5)
    requests = after["requests"] - before["requests"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert requests == 32 and after["images"] - before["images"] == 32
    assert 1 <= passes < requests, after
    assert after["largest_batch"] > 1 and after["max_wait_ms"] == 50


def test_every_accepted_format_reads_as_classifier_predict_reads_it(client, fmnist_run, fmnist_test_images,
                                                                   tmp_path):
    image = Image.open(fmnist_test_images[0][5]).convert("L")
    rgba = image.convert("RGBA")
    rgba.putalpha(200)  # composited over white, as read_image does
    writers = {
        "photo.jpg": lambda p: image.save(p, quality=90), "palette.png": lambda p: image.convert("P").save(p),
        "alpha.png": rgba.save, "16bit.png": lambda p: image.convert("I;16").save(p),
        "animated.gif": lambda p: image.save(p, save_all=True, append_images=[image.transpose(Image.FLIP_LEFT_RIGHT)]),
        "lossless.webp": lambda p: image.save(p, lossless=True), "scan.tiff": image.save, "old.bmp": image.save,
    }
    paths = []
    for name, write in writers.items():
        write(tmp_path / name)
        paths.append(tmp_path / name)
    expected = Classifier.load(fmnist_run).predict(paths, top_k=10)
    response = client.post("/v1/predict", files=[("files", (p.name, p.read_bytes())) for p in paths],
                           params={"top_k": 10})
    assert response.status_code == 200, response.text
    for path, result, ranked in zip(paths, response.json()["predictions"], expected):
        assert result["filename"] == path.name
        assert_matches(result, {p.label: p.probability for p in ranked}, k=10)


# --- model card, docs, page --------------------------------------------------------------------------

def test_model_card_matches_the_run_directory(client, fmnist_run):
    card = client.get("/v1/model").json()
    meta = json.loads((fmnist_run / "model.json").read_text())
    summary = json.loads((fmnist_run / "summary.json").read_text())
    for key in ("architecture", "model_args", "num_classes", "class_names", "in_channels", "image_size",
                "mean", "std", "weights_sha256"):
        assert card[key] == meta[key], key
    assert card["tta"] == meta["tta"] == "flip"
    assert card["parameters"] == summary["params"]
    assert card["dataset"] == summary["dataset"] == "fashion-mnist"
    assert card["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert card["train_seconds"] == pytest.approx(summary["train_seconds"])
    assert card["name"] == fmnist_run.name


def test_docs_and_openapi_describe_the_api(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/v1/stats", "/healthz"} <= set(spec["paths"])
    predict = spec["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "413", "415", "422"} <= set(predict["responses"])
    assert "PredictResponse" in spec["components"]["schemas"]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "://" not in response.text  # nothing loaded from elsewhere
    for element in ('id="file"', 'id="preview"', 'id="results"', 'id="error"', 'id="api-key"'):
        assert element in response.text


# --- refusals ----------------------------------------------------------------------------------------

REFUSALS = {
    # name: (request arguments, status, fragment of the error message)
    "text file": (dict(files={"files": ("notes.txt", b"just some words\n", "text/plain")}), 415, "not an image"),
    "random bytes": (dict(files={"files": ("x.png", os.urandom(2000), "image/png")}), 415, "not an image"),
    "other content type": (dict(content=b"abc", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    "file over max bytes": (dict(files={"files": ("big.png", os.urandom(MAX_BYTES + 1), "image/png")}), 413,
                            "5,000-byte limit"),
    "base64 over max bytes": (dict(json={"images": [base64.b64encode(os.urandom(MAX_BYTES + 3)).decode()]}), 413,
                              "5,000-byte limit"),
    "pixel bomb header": (dict(files={"files": ("bomb.png", png_header(50_000, 50_000), "image/png")}), 413,
                          "1,000,000"),
    "too many pixels": (dict(files={"files": ("blank.png", blank_png(1100, 1000), "image/png")}), 413,
                        "1100x1000 = 1,100,000 pixels"),
    "empty body": (dict(), 422, "no images"),
    "empty JSON body": (dict(content=b"", headers={"Content-Type": "application/json"}), 422, "no images"),
    "no files": (dict(files={"other": ("a.png", b"x", "image/png")}), 422, "no images"),
    "text in the files field": (dict(files={"files": (None, "hello")}), 422, "not a file"),
    "empty file": (dict(files={"files": ("empty.png", b"", "image/png")}), 422, "empty"),
    "missing images field": (dict(json={"top_k": 3}), 422, "images: Field required"),
    "no images in JSON": (dict(json={"images": []}), 422, "images"),
    "bad base64": (dict(json={"images": ["not base64!"]}), 422, "not valid base64"),
    "bad JSON": (dict(content=b'{"images": [', headers={"Content-Type": "application/json"}), 422, "not valid JSON"),
    "bad top_k": (dict(json={"images": ["eA=="]}, params={"top_k": 0}), 422, "top_k"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_bad_input_gets_a_clear_json_error(client, name):
    kwargs, status, fragment = REFUSALS[name]
    assert_error(client.post("/v1/predict", **kwargs), status, fragment)


def test_a_body_over_the_limit_is_refused_from_its_content_length(server):
    """Only the headers are sent: the 413 must come before any of the body is read."""
    url = urlsplit(server)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.putrequest("POST", "/v1/predict")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "byte limit" in json.loads(response.read())["error"]
    connection.close()


def test_unknown_paths_are_json_errors_too(client):
    assert_error(client.get("/v2/predict"), 404, "/docs")
    assert_error(client.get("/v1/predict"), 405, "GET")


# --- API keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "environment"])
def test_api_key_guards_the_api_but_not_health_or_page(fmnist_run, fmnist_test_images, how):
    args, env = (["--api-key", KEY], None) if how == "flag" else ([], {"CNNLAB_API_KEY": KEY})
    image = {"files": png_file(fmnist_test_images[0][0])}
    with running_server(fmnist_run, *args, env=env) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert_error(c.get("/v1/model"), 401, "X-API-Key")
        assert_error(c.post("/v1/predict", files=image), 401, "X-API-Key")
        assert_error(c.get("/v1/model", headers={"X-API-Key": KEY + "x"}), 401, "not valid")
        assert_error(c.get("/v1/model", headers={"Authorization": "Bearer nope"}), 401, "not valid")
        assert c.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.post("/v1/predict", files=image, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


def test_without_a_key_the_api_is_open(client):
    assert client.get("/v1/model").status_code == 200


# --- the command -------------------------------------------------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:") and fragment in lines[0], result.stderr


def test_a_bad_run_dir_is_one_line_and_exit_2(tmp_path):
    assert_one_line_error(cnnlab("serve", str(tmp_path / "missing"), "--port", "0"), "does not exist")


def test_a_port_in_use_is_one_line_and_exit_2(fmnist_run):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert_one_line_error(cnnlab("serve", str(fmnist_run), "--port", str(port)), f"127.0.0.1:{port}")
