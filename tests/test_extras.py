"""`pip install cnnlab` without an extra: a command that needs one names it in one line.

Each command runs in a real subprocess where the extra's packages cannot be imported (a None entry in
sys.modules). That the other commands need no extra is checked where the extras are truly absent:
`make wheel-check` (.ci/wheel-check) installs the wheel alone in a clean virtualenv, and trains,
evaluates and predicts there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as for a package not installed
from cnnlab.cli import main
sys.exit(main({argv!r}))
"""


def without(blocked: list[str], *argv: str) -> subprocess.CompletedProcess:
    code = RUN.format(blocked=blocked, argv=list(argv))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("blocked, command, extra", [
    (["fastapi", "uvicorn"], ["serve", "{run}"], "serve"),
    (["fastapi_offline"], ["serve", "{run}"], "serve"),
    (["prometheus_client"], ["serve", "{run}"], "serve"),
    (["onnx", "onnxruntime"], ["export", "{run}"], "export"),
    (["onnxruntime"], ["predict", "{run}", "{image}", "--backend", "onnx"], "export"),
    (["matplotlib"], ["report", "{run}"], "report"),
    (["matplotlib"], ["explain", "{run}", "{image}"], "report"),
])
def test_a_missing_extra_is_named_in_one_line(blocked, command, extra, fmnist_run: Path, fmnist_test_images):
    argv = [part.format(run=fmnist_run, image=fmnist_test_images[0][0]) for part in command]
    result = without(blocked, *argv)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cnnlab: error: This command needs the ")
    assert f"pip install 'cnnlab[{extra}]'" in line
