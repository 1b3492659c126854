"""`cnnlab serve` in a subprocess, for the server and web page tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

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
            url = _wait_for_url(proc, Path(log.name))
            _wait_healthy(url)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"serving .* at (http://127\.0\.0\.1:\d+)/", log.read_text())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"cnnlab serve exited with status {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise RuntimeError(f"cnnlab serve did not start within {START_TIMEOUT} s:\n{log.read_text()}")


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
