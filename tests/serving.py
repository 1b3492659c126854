"""`cnnlab serve` in a subprocess, for the server and web page tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from cnnlab.bench_deploy import server_url

START_TIMEOUT = 120  # seconds: importing torch and loading the model on a busy machine


@contextmanager
def running_server(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m cnnlab serve RUN_DIR --port 0 ARGS` and yield its base URL once /healthz answers.

    The port comes from the server's own "serving ... at http://..." line; CNNLAB_API_KEY is
    removed from the environment unless `env` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "CNNLAB_API_KEY"} | (env or {})
    with tempfile.NamedTemporaryFile("w+", prefix="cnnlab-serve-", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--port", "0", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=environ)
        try:
            url = server_url(proc, Path(log.name), START_TIMEOUT)
            _wait_healthy(url)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/healthz did not answer within {START_TIMEOUT} s")
