"""Deployment benchmarks (not tests): `cnnlab serve` under concurrent load, a soak of valid and
malformed uploads mixed, and `cnnlab predict` throughput over a folder of PNGs with the torch and
onnx backends.

    python -m benchmarks serve RUN_DIR [--clients 16] [--seconds 60]
    python -m benchmarks soak RUN_DIR [--clients 32] [--seconds 60] [--invalid-share 0.5]
    python -m benchmarks overload RUN_DIR [--clients 64] [--max-queue 16] [--seconds 30]
    python -m benchmarks predict RUN_DIR [--images 10000]
    python -m benchmarks engines RUN_DIR [--batches 1,8,16,64]

The server and `cnnlab predict` run as real subprocesses; the load comes from a separate
client process of threads on keep-alive connections, each sending one image per request.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

START_TIMEOUT = 120


def write_test_pngs(run_dir: Path, folder: Path, count: int) -> list[str]:
    """The first `count` test images of the run's dataset as PNG files; returns their class names."""
    import yaml
    from PIL import Image

    from cnnlab.data.load import load_dataset

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

class Post(NamedTuple):
    """A request body for POST /v1/predict and the answer it should get."""
    body: bytes
    content_type: str
    status: int = 200  # the HTTP status expected
    label: str | None = None  # the top-1 class expected, for a valid image; None: not checked


Record = Callable[[Post, int, bytes, float], None]  # (post, HTTP status or 0 if the connection failed, body, s)


def multipart(data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body holding one file in the field 'files', and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _client(host: str, port: int, posts: list[Post], stop_at: float, record: Record) -> None:
    """Send `posts` in turn on one keep-alive connection until `stop_at`, recording every answer."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    i = 0
    while time.perf_counter() < stop_at:
        post = posts[i % len(posts)]
        i += 1
        start = time.perf_counter()
        retry_after = None
        try:
            conn.request("POST", "/v1/predict", body=post.body, headers={"Content-Type": post.content_type})
            response = conn.getresponse()
            status, payload = response.status, response.read()
            retry_after = response.getheader("Retry-After") if status == 503 else None
        except (OSError, http.client.HTTPException) as exc:
            status, payload = 0, f"{type(exc).__name__}: {exc}".encode()
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
        record(post, status, payload, time.perf_counter() - start)
        if retry_after is not None and retry_after.isdigit():  # a well-behaved client waits as told
            time.sleep(max(0.0, min(float(retry_after), stop_at - time.perf_counter())))
    conn.close()


def run_clients(url: str, posts: list[Post], clients: int, seconds: float, record: Record) -> float:
    """`clients` threads, each sending its share of `posts` for `seconds`; returns the wall time."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=_client, args=(host, int(port), posts[i::clients] or posts, stop_at, record))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def load_clients(url: str, pngs: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads posting single images for `seconds`; requests/s and latency percentiles."""
    latencies: list[float] = []
    errors: list[str] = []

    def record(post: Post, status: int, payload: bytes, seconds: float) -> None:
        if status == 200:
            latencies.append(seconds)
        else:
            errors.append(f"{status}: {payload[:200]!r}")

    wall = run_clients(url, [Post(*multipart(png)) for png in pngs], clients, seconds, record)
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "requests_per_second": round(len(latencies) / wall, 1), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1), "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            "errors": len(errors), "first_errors": errors[:3]}


def bench_serve(run_dir: Path, clients: list[int], seconds: float, serve_args: list[str],
                engines: list[str] | None = None, rounds: int = 1) -> list[dict[str, Any]]:
    """Requests/s and latency at each number of clients, per serving engine (`cnnlab serve
    --engine`). With several engines, each round runs every engine's server in turn, so they are
    compared side by side on the same machine minutes; the ratios to the first engine come last."""
    engines = engines or [None]
    with tempfile.TemporaryDirectory(prefix="cnnlab-serve-bench-") as tmp:
        write_test_pngs(run_dir, Path(tmp) / "png", 256)
        pngs = [p.read_bytes() for p in sorted((Path(tmp) / "png").glob("*.png"))]
        results = []
        for round_ in range(1, rounds + 1):
            for engine in engines:
                args = serve_args + (["--engine", engine] if engine else [])
                with _server(run_dir, args, Path(tmp) / "server.log") as (url, _):
                    load_clients(url, pngs, 4, 2.0)  # warm-up
                    for n in clients:
                        before = _get_json(url, "/v1/stats")
                        result = {"engine": _get_json(url, "/v1/model")["engine"], "round": round_,
                                  **load_clients(url, pngs, n, seconds)}
                        after = _get_json(url, "/v1/stats")
                        passes = max(after["forward_passes"] - before["forward_passes"], 1)
                        result["mean_images_per_forward_pass"] = round((after["images"] - before["images"]) / passes, 1)
                        results.append(result)
                        print(json.dumps(result), flush=True)
        if len(engines) > 1:
            for n in clients:
                rates = {e: statistics.fmean(r["requests_per_second"] for r in results
                                             if r["clients"] == n and r["engine"] == e)
                         for e in dict.fromkeys(r["engine"] for r in results)}
                first = next(iter(rates.values()))
                print(json.dumps({"clients": n, "requests_per_second": {e: round(v, 1) for e, v in rates.items()},
                                  "ratio": {e: round(v / first, 2) for e, v in rates.items()}}), flush=True)
        return results


def bench_engines(run_dir: Path, batches: list[int], seconds: float = 2.0) -> list[dict[str, Any]]:
    """The serving engines' forward pass in-process (what one micro-batch costs), side by side:
    milliseconds per batch of uint8 images, alternating engines, best of three rounds each."""
    import torch

    from cnnlab.deploy.engine import load_engine
    from cnnlab.models.classifier import Classifier

    classifier = Classifier.load(run_dir)
    engines = {name: load_engine(classifier, name)[0] for name in ("torch", "onnxruntime")}
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch in batches:
        images = torch.randint(0, 256, (batch, classifier.in_channels, *classifier.image_size), dtype=torch.uint8,
                               generator=gen)
        best = {name: math.inf for name in engines}
        for _ in range(3):
            for name, engine in engines.items():
                engine(images)  # warm
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds / 3:
                    engine(images)
                    runs += 1
                best[name] = min(best[name], (time.perf_counter() - start) / runs * 1000)
        result = {"batch": batch, **{f"{name}_ms": round(ms, 2) for name, ms in best.items()},
                  "torch_over_onnxruntime": round(best["torch"] / best["onnxruntime"], 2)}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


@contextmanager
def _server(run_dir: Path, serve_args: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`cnnlab serve RUN_DIR --port 0 ARGS` in a subprocess: its base URL and the process, until the block ends."""
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--port", "0", *serve_args],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            yield server_url(proc, log_path), proc
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


# ---------------------------------------------------------------- soak: valid and invalid uploads mixed

SOAK_MAX_BYTES = 200_000  # per image: small limits keep the oversized uploads cheap to send
SOAK_MAX_PIXELS = 1_000_000
SOAK_SERVE_ARGS = ["--max-bytes", str(SOAK_MAX_BYTES), "--max-pixels", str(SOAK_MAX_PIXELS)]


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB, from /proc/PID/status (Linux); ProcessLookupError once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} has exited") from None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the line reads "VmRSS:   123456 kB"
    raise ProcessLookupError(f"process {pid} has exited")  # a zombie, not yet reaped, has no VmRSS


class RssSampler:
    """A process's RSS sampled on entering the `with` block, every `interval` seconds by a thread
    while it runs, and on leaving it; sampling stops early if the process exits."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssSampler:
        self.samples.append(rss_mib(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval) and self._sample_once():
            pass

    def _sample_once(self) -> bool:
        try:
            self.samples.append(rss_mib(self.pid))
            return True
        except ProcessLookupError:
            return False


def invalid_posts(png: bytes, max_bytes: int, max_pixels: int) -> list[Post]:
    """One upload of each kind the server must refuse: not an image, a truncated PNG, a PNG with
    broken pixel data, too many bytes, too many pixels, a broken multipart body, bad base64 in JSON."""
    from PIL import Image

    rng = random.Random(0)
    side = math.isqrt(max_pixels) + 1
    too_large = io.BytesIO()
    Image.new("L", (side, side), 255).save(too_large, "PNG")  # compresses to a few kB
    return [Post(*multipart(rng.randbytes(2000)), 415), Post(*multipart(png[:len(png) // 2]), 415),
            Post(*multipart(broken_zlib_png(png)), 415),
            Post(*multipart(rng.randbytes(max_bytes + 1)), 413), Post(*multipart(too_large.getvalue()), 413),
            Post(b"--x\r\nnot a header\r\n\r\n", "multipart/form-data; boundary=x", 422),
            Post(b'{"images": ["not base64!"]}', "application/json", 422),
            Post('{"images": ["\u00e9t\u00e9"]}'.encode(), "application/json", 422)]  # not even ASCII


def broken_zlib_png(png: bytes) -> bytes:
    """`png` with the zlib checksum of its (first) pixel data chunk flipped and the chunk's CRC made to
    match, so only the decompressor notices: an error in mid-image, which crashed torchvision's decoder."""
    idat = png.index(b"IDAT")
    end = idat + 4 + int.from_bytes(png[idat - 4:idat], "big")  # where the chunk's CRC starts
    data = png[idat + 4:end - 1] + bytes([png[end - 1] ^ 0xFF])
    return png[:idat + 4] + data + zlib.crc32(b"IDAT" + data).to_bytes(4, "big") + png[end + 4:]


def soak_posts(run_dir: Path, pngs: list[Path], invalid_share: float, count: int = 512) -> list[Post]:
    """`count` posts in a fixed random order: the PNGs, each with `Classifier.predict`'s top-1 class,
    mixed with `invalid_posts` (SOAK_MAX_BYTES, SOAK_MAX_PIXELS) making up about `invalid_share` of them."""
    from cnnlab.models.classifier import Classifier

    labels = [ranked[0].label for ranked in Classifier.load(run_dir).predict(pngs, top_k=1)]
    valid = [Post(*multipart(path.read_bytes()), 200, label) for path, label in zip(pngs, labels)]
    invalid = invalid_posts(pngs[0].read_bytes(), SOAK_MAX_BYTES, SOAK_MAX_PIXELS)
    rng = random.Random(0)
    return [rng.choice(invalid) if rng.random() < invalid_share else rng.choice(valid) for _ in range(count)]


def soak(url: str, pid: int, posts: list[Post], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads sending `posts` for `seconds` to the server with process id `pid`: requests/s,
    valid uploads answered right or failed (dropped), invalid ones refused with the expected 4xx or not,
    5xx answers, and the server's RSS after a warm-up, at its peak and at the end."""
    outcomes: list[tuple[Post, int, bytes]] = []

    def record(post: Post, status: int, payload: bytes, seconds: float) -> None:
        outcomes.append((post, status, payload))

    run_clients(url, posts, 4, 2.0, lambda *outcome: None)  # warm-up
    with RssSampler(pid) as rss:
        wall = run_clients(url, posts, clients, seconds, record)
    valid = [(post, status, payload) for post, status, payload in outcomes if post.label is not None]
    dropped = [f"{status}: {payload[:200]!r}" for post, status, payload in valid
               if status != 200 or _top1(payload) != post.label]
    invalid = [(post, status) for post, status, _ in outcomes if post.label is None]
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(outcomes),
            "requests_per_second": round(len(outcomes) / wall, 1), "valid_ok": len(valid) - len(dropped),
            "valid_failed": len(dropped), "invalid_4xx": sum(400 <= status < 500 for _, status in invalid),
            "invalid_unexpected_status": sum(status != post.status for post, status in invalid),
            "server_errors": sum(status >= 500 for _, status, _ in outcomes),
            "rss_start_mib": round(rss.samples[0], 1), "rss_max_mib": round(max(rss.samples), 1),
            "rss_end_mib": round(rss.samples[-1], 1), "first_failures": dropped[:3]}


def _top1(payload: bytes) -> str | None:
    try:
        return json.loads(payload)["predictions"][0]["predictions"][0]["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def bench_soak(run_dir: Path, clients: int, seconds: float, invalid_share: float) -> dict[str, Any]:
    """`soak` against a fresh server run with SOAK_MAX_BYTES and SOAK_MAX_PIXELS, on the run's test images."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-soak-bench-") as tmp, \
            _server(run_dir, SOAK_SERVE_ARGS, Path(tmp) / "server.log") as (url, proc):
        write_test_pngs(run_dir, Path(tmp) / "png", 256)
        posts = soak_posts(run_dir, sorted((Path(tmp) / "png").glob("*.png")), invalid_share)
        result = soak(url, proc.pid, posts, clients, seconds)
        print(json.dumps(result), flush=True)
        return result


# ---------------------------------------------------------------- overload: more clients than the server can serve

UNBOUNDED = 1_000_000  # --max-queue for the comparison run: nothing is ever refused


def bench_overload(run_dir: Path, clients: int, max_queue: int, seconds: float) -> list[dict[str, Any]]:
    """`clients` threads posting single images without pause (after a 503, each waits its
    Retry-After, as HTTP clients should), against a server with --max-queue `max_queue` and, side by
    side, one without a bound: answers by status, requests/s, the 200s' latency percentiles (as the
    clients see them: their threads share the cores with the server), and the server's RSS."""
    results = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-overload-bench-") as tmp:
        write_test_pngs(run_dir, Path(tmp) / "png", 256)
        posts = [Post(*multipart(p.read_bytes())) for p in sorted((Path(tmp) / "png").glob("*.png"))]
        for bound in (max_queue, UNBOUNDED):
            with _server(run_dir, ["--max-queue", str(bound)], Path(tmp) / "server.log") as (url, proc):
                run_clients(url, posts, 4, 2.0, lambda *outcome: None)  # warm-up
                statuses: list[int] = []
                latencies: list[float] = []

                def record(post: Post, status: int, payload: bytes, seconds: float) -> None:
                    statuses.append(status)
                    if status == 200:
                        latencies.append(seconds)

                with RssSampler(proc.pid) as rss:
                    wall = run_clients(url, posts, clients, seconds, record)
                alive = proc.poll() is None and _get_json(url, "/healthz").get("status") == "ok"
            ordered = sorted(latencies)

            def pct(q: float) -> float:
                return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else None

            results.append({"max_queue": "none" if bound == UNBOUNDED else bound, "clients": clients,
                            "seconds": round(wall, 1), "ok_200": statuses.count(200),
                            "refused_503": statuses.count(503),
                            "other": sum(s not in (200, 503) for s in statuses),
                            "ok_per_second": round(statuses.count(200) / wall, 1), "p50_ms": pct(0.5),
                            "p99_ms": pct(0.99), "max_ms": pct(1.0), "rss_start_mib": round(rss.samples[0], 1),
                            "rss_max_mib": round(max(rss.samples), 1), "alive_after": alive})
            print(json.dumps(results[-1]), flush=True)
    return results


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
    with tempfile.TemporaryDirectory(prefix="cnnlab-predict-bench-") as tmp:
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
