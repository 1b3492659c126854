"""`cnnlab serve` in operation, against real servers on loopback: Prometheus metrics read with
prometheus-client's own parser, a bounded queue that answers 503 with Retry-After, graceful
shutdown on SIGTERM, and the device flag."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import running_server, server_process

from benchmarks.deploy import server_url
from cnnlab.deploy.serve import create_app


@pytest.fixture(scope="module")
def server(fmnist_run: Path) -> Iterator[str]:
    with running_server(fmnist_run) as url:
        yield url


def metrics(url: str) -> dict[str, list]:
    """The /metrics page parsed by Prometheus's own parser: samples by metric family name."""
    answer = httpx.get(f"{url}/metrics", timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}


def sample(families: dict[str, list], name: str, **labels: str) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket").removesuffix("_sum")
    values = [s.value for s in families[family] if s.name == name and all(s.labels.get(k) == v
                                                                            for k, v in labels.items())]
    return sum(values)


def slow_request(url: str, body: bytes) -> socket.socket:
    """Start a POST /v1/predict whose body is held back: the request holds a place in the queue."""
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    return sock


def finish(sock: socket.socket, body: bytes) -> tuple[int, bytes]:
    """Send the rest of the body; the status and body of the answer."""
    sock.sendall(body[5:])
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length"))


def json_body(path: Path) -> bytes:
    import base64
    return json.dumps({"images": [base64.b64encode(path.read_bytes()).decode()]}).encode()


def test_metrics_follow_the_traffic(server, fmnist_run, fmnist_test_images):
    paths = fmnist_test_images[0][:3]
    before = metrics(server)
    for path in paths:
        assert httpx.post(f"{server}/v1/predict", files={"files": (path.name, path.read_bytes(), "image/png")},
                          timeout=60).status_code == 200
    assert httpx.post(f"{server}/v1/predict", content=b"x", headers={"Content-Type": "text/plain"},
                      timeout=60).status_code == 415
    assert httpx.get(f"{server}/no/such/page", timeout=60).status_code == 404
    after = metrics(server)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("cnnlab_http_requests_total", route="/v1/predict", method="POST", status="200") == 3
    assert grew("cnnlab_http_requests_total", route="/v1/predict", method="POST", status="415") == 1
    assert grew("cnnlab_http_requests_total", route="unmatched", status="404") == 1
    assert grew("cnnlab_http_request_duration_seconds_count", route="/v1/predict") == 4
    assert grew("cnnlab_images_total") == 3
    assert grew("cnnlab_batch_images_count") >= 1 and grew("cnnlab_batch_images_sum") == 3
    # the raw path never becomes a label: only route templates
    routes = {s.labels["route"] for s in after["cnnlab_http_requests"]}
    assert "/no/such/page" not in routes
    assert sample(after, "cnnlab_queue_images") == 0 and sample(after, "cnnlab_requests_in_progress") == 0
    info = after["cnnlab_model_info"][0].labels
    assert info["name"] == fmnist_run.name and info["architecture"] == "fastnet" and info["classes"] == "10"
    assert info["device"] == "cpu" and len(info["weights_sha256"]) == 64


def test_a_full_queue_answers_503_with_retry_after(fmnist_run, fmnist_test_images):
    body = json_body(fmnist_test_images[0][0])
    with running_server(fmnist_run, "--max-queue", "2") as url, ExitStack() as stack:
        held = [slow_request(url, body) for _ in range(2)]
        for sock in held:
            stack.callback(sock.close)
        deadline = time.monotonic() + 60
        while sample(metrics(url), "cnnlab_requests_in_progress") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "application/json"},
                             timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]
        assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200  # not a classification: never refused
        # the held requests are still answered, and then there is room again
        assert [finish(sock, body)[0] for sock in held] == [200, 200]
        assert httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "application/json"},
                          timeout=60).status_code == 200
        stats = httpx.get(f"{url}/v1/stats", timeout=60).json()
        assert stats["rejected"] == 1 and stats["max_queue"] == 2
        assert sample(metrics(url), "cnnlab_rejected_requests_total") == 1


@pytest.mark.parametrize("route", ["/v1/predict", "/v2/models/{name}/infer"])
def test_requests_waiting_for_the_model_hold_their_places(fmnist_run, fmnist_test_images, route):
    """A place in --max-queue is held until the answer, not only while the body is read: requests
    whose images wait for a busy model count, so a third request is refused."""
    app = create_app(fmnist_run, max_queue=2, max_wait_ms=0, engine="torch")
    service = app.state.service
    release = threading.Event()
    forward = service.batcher.forward
    service.batcher.forward = lambda images: (release.wait(60), forward(images))[1]  # a model that is busy
    png = base64.b64encode(fmnist_test_images[0][0].read_bytes()).decode()
    path = route.format(name=fmnist_run.name)
    body = {"images": [png]} if path.startswith("/v1") else \
        {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [png]}]}

    async def scenario() -> list[int]:
        await service.batcher.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cnnlab") as client:
                waiting = [asyncio.create_task(client.post(path, json=body)) for _ in range(2)]
                for _ in range(500):  # until both are admitted (at most 5 s): they then wait for the model
                    if service.in_progress >= 2:
                        break
                    await asyncio.sleep(0.01)
                refused = await asyncio.wait_for(client.post(path, json=body), 30)
                release.set()
                return [refused.status_code] + [(await task).status_code for task in waiting]
        finally:
            release.set()
            await service.batcher.stop()

    assert asyncio.run(scenario()) == [503, 200, 200]
    assert service.rejected == 1 and service.in_progress == 0


def test_overload_gets_only_200s_and_503s(fmnist_run, fmnist_test_images):
    """Many more clients than places: every answer is a prediction or a 503, and the server lives."""
    body = json_body(fmnist_test_images[0][0])
    with server_process(fmnist_run, "--max-queue", "4") as server:
        def client(_: int) -> list[int]:
            with httpx.Client(timeout=60) as c:
                return [c.post(f"{server.url}/v1/predict", content=body,
                               headers={"Content-Type": "application/json"}).status_code for _ in range(15)]

        with ThreadPoolExecutor(32) as pool:
            statuses = [s for result in pool.map(client, range(32)) for s in result]
        assert set(statuses) <= {200, 503} and 200 in statuses, sorted(set(statuses))
        assert server.process.poll() is None
        assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200


def test_sigterm_answers_requests_in_progress_then_exits_0(fmnist_run, fmnist_test_images, tmp_path):
    body = json_body(fmnist_test_images[0][0])
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(fmnist_run), "--port", "0"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = server_url(proc, log)
        assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200
        in_progress = slow_request(url, body)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the listening socket closes: new connections are refused
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                time.sleep(0.1)
            except ConnectionRefusedError:
                break
        else:
            pytest.fail("the server still accepted connections 30 s after SIGTERM")
        status, answer = finish(in_progress, body)
        assert status == 200 and json.loads(answer)["predictions"]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped on SIGTERM after answering 1 classification request" in log.read_text()


def test_device_flag(fmnist_run):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda would start")
    result = subprocess.run([sys.executable, "-m", "cnnlab", "serve", str(fmnist_run), "--device", "cuda"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cnnlab: error: --device cuda was asked for, but PyTorch sees no CUDA GPU; use cpu."]
