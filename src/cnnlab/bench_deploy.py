"""Deployment benchmarks (not tests): `cnnlab serve` under concurrent load, and `cnnlab predict`
throughput over a folder of PNGs with the torch and onnx backends.

    python -m cnnlab.bench serve RUN_DIR [--clients 16] [--seconds 60]
    python -m cnnlab.bench predict RUN_DIR [--images 10000]

The server and `cnnlab predict` run as real subprocesses; the load comes from a separate
client process of threads on keep-alive connections, each sending one image per request.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

START_TIMEOUT = 120


def write_test_pngs(run_dir: Path, folder: Path, count: int) -> list[str]:
    """The first `count` test images of the run's dataset as PNG files; returns their class names."""
    import yaml
    from PIL import Image

    from .datasets import load_dataset

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    bundle = load_dataset(config["dataset"], val_split=0, progress=False)
    count = min(count, len(bundle.test))
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(count):
        array = bundle.test.images[i].permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(array).save(folder / f"{i:05d}.png")
        labels.append(bundle.class_names[int(bundle.test.labels[i])])
    return labels


# ---------------------------------------------------------------- serve under load

def _multipart(png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _client(host: str, port: int, images: list[bytes], stop_at: float, latencies: list[float],
            errors: list[str]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    bodies = [_multipart(png) for png in images]
    i = 0
    while time.perf_counter() < stop_at:
        body, ctype = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append(f"{response.status}: {payload[:200]!r}")
                continue
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            continue
        latencies.append(time.perf_counter() - start)
    conn.close()


def load_clients(url: str, pngs: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads posting single images for `seconds`; requests/s and latency percentiles."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=_client, args=(host, int(port), pngs[i::clients] or pngs, stop_at,
                                                      latencies, errors)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "requests_per_second": round(len(latencies) / wall, 1), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1), "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            "errors": len(errors), "first_errors": errors[:3]}


def bench_serve(run_dir: Path, clients: list[int], seconds: float, serve_args: list[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-serve-") as tmp:
        write_test_pngs(run_dir, Path(tmp) / "png", 256)
        pngs = [p.read_bytes() for p in sorted((Path(tmp) / "png").glob("*.png"))]
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--port", "0", *serve_args],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            url = server_url(proc, Path(log.name))
            load_clients(url, pngs, 4, 2.0)  # warm-up
            results = []
            for n in clients:
                results.append(load_clients(url, pngs, n, seconds))
                stats = _get_json(url, "/v1/stats")
                results[-1]["mean_images_per_forward_pass"] = round(stats["images"] / max(stats["forward_passes"], 1), 1)
                print(json.dumps(results[-1]), flush=True)
            return results
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def server_url(proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> str:
    """The base URL from a starting `cnnlab serve`'s own "serving ... at http://..." line in its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"serving .* at (http://[\d.]+:\d+)/", log.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"cnnlab serve exited with status {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise RuntimeError(f"cnnlab serve did not start within {timeout} s:\n{log.read_text()}")


def _get_json(url: str, path: str) -> dict[str, Any]:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


# ---------------------------------------------------------------- predict over a folder

PREDICT_VARIANTS = [
    ("torch", ["--backend", "torch"]),
    ("onnx", ["--backend", "onnx"]),
    ("torch, --precision bf16", ["--backend", "torch", "--precision", "bf16"]),
    ("torch, --tta none", ["--backend", "torch", "--tta", "none"]),
    ("onnx, --tta none", ["--backend", "onnx", "--tta", "none"]),
    ("torch, --precision bf16 --tta none", ["--backend", "torch", "--precision", "bf16", "--tta", "none"]),
]


def bench_predict(run_dir: Path, images: int, batch_size: int) -> list[dict[str, Any]]:
    """`cnnlab predict` over a folder of PNGs, per backend and setting: wall time of the whole
    command, its start-up (the same command on one image: imports, model load), images/s after
    start-up with decoding included, and agreement of every setting's top-1 with the default's."""
    results, labels = [], {}
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-predict-") as tmp:
        folder = Path(tmp) / "png"
        truth = write_test_pngs(run_dir, folder, images)
        if not (run_dir / "model.onnx").is_file():
            subprocess.run([sys.executable, "-m", "cnnlab", "export", str(run_dir), "--format", "onnx"], check=True,
                           stdout=subprocess.DEVNULL)
        one = Path(tmp) / "one"
        one.mkdir()
        (one / "0.png").write_bytes((folder / "00000.png").read_bytes())
        for name, flags in PREDICT_VARIANTS:
            startup, _ = _predict_once(run_dir, one, flags, batch_size, Path(tmp) / "one.csv")
            wall, rows = _predict_once(run_dir, folder, flags, batch_size, Path(tmp) / "out.csv")
            labels[name] = [row[1] for row in rows]
            accuracy = sum(a == b for a, b in zip(labels[name], truth)) / len(truth)
            disagree = sum(a != b for a, b in zip(labels[name], labels[PREDICT_VARIANTS[0][0]]))
            results.append({"setting": name, "images": len(rows), "wall_seconds": round(wall, 2),
                            "startup_seconds": round(startup, 2),
                            "images_per_second": round(len(rows) / max(wall - startup, 1e-9)),
                            "accuracy": round(accuracy, 4), "top1_differs_from_torch_fp32": disagree})
            print(json.dumps(results[-1]), flush=True)
    return results


def _predict_once(run_dir: Path, folder: Path, flags: list[str], batch_size: int,
                  out: Path) -> tuple[float, list[list[str]]]:
    start = time.perf_counter()
    with open(out, "w") as fh:
        subprocess.run([sys.executable, "-m", "cnnlab", "predict", str(run_dir), str(folder), "--format", "csv",
                        "--batch-size", str(batch_size), "--no-progress", *flags], stdout=fh, check=True)
    wall = time.perf_counter() - start
    return wall, [line.split(",") for line in out.read_text().splitlines()[1:]]
