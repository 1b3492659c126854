"""Model files from elsewhere: loading reads only model.safetensors and model.json, checks the
sha256 and every field, and never unpickles, so a planted pickle cannot run code.

The planted payloads are proven live first: plain `pickle.load` / `torch.load(weights_only=False)`
in a subprocess does create the marker file that every other test asserts is absent.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cnnlab import Classifier
from cnnlab.card import ModelCard
from cnnlab.rundir import RunDir

MODEL_FILE, MODEL_META = RunDir.WEIGHTS, RunDir.CARD
from test_cli import assert_usage_error, cnnlab
from usage import usage_error

from cnnlab.errors import CnnlabError
from cnnlab.files import sha256_file
from cnnlab.models.registry import create_model

CLASSES = ["ant", "bee", "cat"]
pytestmark = pytest.mark.usefixtures("use_cache_env")


class Payload:
    """Unpickling this calls open(marker, 'w'): the file appearing proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def payload_bytes(kind: str, marker: Path) -> bytes:
    """A malicious file: a plain pickle, or a torch.save archive (what checkpoint.pt files are)."""
    if kind == "pickle":
        return pickle.dumps({"model": Payload(marker)}, protocol=2)
    buffer = io.BytesIO()
    torch.save({"model": Payload(marker), "epoch": 3}, buffer)
    return buffer.getvalue()


KINDS = ["pickle", "torch.save"]
UNSAFE_LOAD = {"pickle": "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
               "torch.save": "import sys, torch; torch.load(sys.argv[1], weights_only=False)"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny folder dataset: three classes of four 12x12 grayscale images."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(4):
            Image.new("L", (12, 12), 60 * c + 10 * i).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """A run directory written by RunDir.write_model, as training writes it."""
    run = tmp_path_factory.mktemp("good") / "run"
    torch.manual_seed(0)
    model = create_model("fastnet", 1, len(CLASSES), widths=[4, 8])
    run.mkdir(parents=True)
    RunDir(run).write_model(model.state_dict(), ModelCard(
        architecture="fastnet", model_args={"widths": [4, 8]}, class_names=CLASSES, in_channels=1, image_size=(12, 12),
        mean=[0.5], std=[0.25], dataset=f"folder:{images}", tta="none", tta_flip=True))
    return run


@pytest.fixture
def run(good_run: Path, tmp_path: Path) -> Path:
    """A private copy of the good run, free to tamper with."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in (MODEL_FILE, MODEL_META):
        (copy / name).write_bytes((good_run / name).read_bytes())
    return copy


def edit_meta(run: Path, **changes) -> None:
    """Change model.json fields (None deletes one)."""
    meta = json.loads((run / MODEL_META).read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (run / MODEL_META).write_text(json.dumps(meta))


def resign(run: Path) -> None:
    """Record the current weights' sha256, as someone who replaced the weights on purpose would."""
    edit_meta(run, weights_sha256=sha256_file(run / MODEL_FILE))


def load_error(run: Path) -> str:
    with pytest.raises(CnnlabError) as info:
        Classifier.load(run)
    return str(info.value)


# ---------------------------------------------------------------- planted pickles

@pytest.mark.parametrize("kind", KINDS)
def test_planted_payloads_are_live(kind: str, tmp_path: Path) -> None:
    """Control: the payloads below do run code when unpickled the unsafe way."""
    marker, path = tmp_path / "pwned", tmp_path / "payload"
    path.write_bytes(payload_bytes(kind, marker))
    subprocess.run([sys.executable, "-c", UNSAFE_LOAD[kind], str(path)], check=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_refuses_a_planted_pickle(kind: str, tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / RunDir.CHECKPOINT
    path.write_bytes(payload_bytes(kind, marker))
    with pytest.raises(CnnlabError, match="not a valid cnnlab checkpoint"):
        RunDir(tmp_path).read_checkpoint()
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signed", [False, True], ids=["old-sha256", "new-sha256"])
def test_pickle_renamed_to_model_safetensors_is_refused(kind: str, signed: bool, run: Path, tmp_path: Path,
                                                        images: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    (run / MODEL_FILE).write_bytes(payload_bytes(kind, marker))
    if signed:  # the sha256 passes: the safetensors parser itself must refuse the file
        resign(run)
    fragment = "not a valid safetensors file" if signed else "does not match the sha256"
    assert fragment in load_error(run)
    assert fragment in usage_error(["predict", str(run), str(images)], capsys)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "serve"])
def test_cli_refuses_a_signed_pickle_in_one_line(command: str, run: Path, tmp_path: Path, images: Path,
                                                 cache_env: dict[str, str]) -> None:
    marker = tmp_path / "pwned"
    (run / MODEL_FILE).write_bytes(payload_bytes("torch.save", marker))
    resign(run)
    extra = {"predict": [str(images)], "serve": ["--port", "0"]}.get(command, [])
    assert_usage_error(cnnlab(command, str(run), *extra, env=cache_env), "not a valid safetensors file")
    assert not marker.exists()


AUDIT = """
import json, os, sys
from pathlib import Path
from cnnlab.cli import main
from cnnlab.deploy.serve import create_app

run, images = Path(sys.argv[1]).resolve(), sys.argv[2]
written, read, classes = set(), set(), []

def audit(event, args):
    if event == "pickle.find_class":
        classes.append(f"{args[0]}.{args[1]}")
    elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(args[0])).resolve()
        if path.parent != run:
            return
        if any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR):
            written.add(path.name)
        elif path.is_file() and path.name not in written:  # the export check reads back its own file
            read.add(path.name)

sys.addaudithook(audit)
codes = [main(["evaluate", str(run), "--no-progress"]), main(["predict", str(run), images, "--no-progress"]),
         main(["export", str(run), "--format", "torchscript"])]
create_app(run)
print(json.dumps({"codes": codes, "read": sorted(read), "classes": classes}))
"""


def test_loading_reads_only_the_model_files_and_never_unpickles(run: Path, images: Path, tmp_path: Path,
                                                               cache_env: dict[str, str]) -> None:
    """evaluate, predict, export and serve, with pickles planted under every usual name: an audit
    hook sees which files of the run directory are opened and whether anything is unpickled."""
    marker = tmp_path / "pwned"
    for name in ("checkpoint.pt", "model.pt", "model.pth", "pytorch_model.bin"):
        (run / name).write_bytes(payload_bytes("torch.save", marker))
    result = subprocess.run([sys.executable, "-c", AUDIT, str(run), str(images)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **cache_env})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0]
    assert report["read"] == sorted([MODEL_FILE, MODEL_META])
    assert report["classes"] == []
    assert not marker.exists()


# ---------------------------------------------------------------- damaged or tampered files

BAD_META = [
    ("no-architecture", {"architecture": None}, "lacks a valid 'architecture'"),
    ("classes-as-text", {"num_classes": "3"}, "lacks a valid 'num_classes'"),
    ("channels-as-bool", {"in_channels": True}, "lacks a valid 'in_channels'"),
    ("names-not-list", {"class_names": "ant,bee,cat"}, "lacks a valid 'class_names'"),
    ("newer-format", {"format_version": 2}, "newer cnnlab"),
    ("older-format", {"format_version": 0}, "format_version 0"),
    ("unknown-architecture", {"architecture": "alexnet-9000"}, "which this process does not know"),
    ("unknown-tv-architecture", {"architecture": "tv:nonexistent_net"}, "which this process does not know"),
    # an import path is the user's own model: only with its source's sha256, and only an nn.Module
    # class or a Python function, never just any callable
    ("import-path-without-sha", {"architecture": "subprocess:run"}, "without the sha256 of its source"),
    ("builtin-callable", {"architecture": "os:system", "source_sha256": "0" * 64}, "not a torch.nn.Module class"),
    ("vanished-source", {"architecture": "/nonexistent/net.py:Net", "source_sha256": "0" * 64}, "no longer exists"),
    ("bad-source-sha", {"source_sha256": "xyz"}, "source_sha256"),
    ("fewer-names", {"class_names": ["ant", "bee"]}, "2 class names for 3 classes"),
    ("zero-classes", {"num_classes": 0, "class_names": []}, "at least one class"),
    ("names-not-strings", {"class_names": [1, 2, 3]}, "not strings"),
    ("two-channels", {"in_channels": 2}, "in_channels 2"),
    ("size-one-side", {"image_size": [12]}, "image_size [12]"),
    ("size-negative", {"image_size": [12, -12]}, "image_size"),
    ("size-huge", {"image_size": [12, 10**9]}, "image_size"),
    ("mean-per-rgb", {"mean": [0.5, 0.5, 0.5]}, "1 number(s)"),
    ("std-zero", {"std": [0]}, "standard deviation of 0"),
    ("std-nan", {"std": [math.nan]}, "std [nan]"),
    ("mean-text", {"mean": ["0.5"]}, "mean"),
    ("sha-short", {"weights_sha256": "abc"}, "64 hexadecimal"),
    ("sha-other", {"weights_sha256": "0" * 64}, "does not match the sha256"),
    ("unknown-tta", {"tta": "sideways"}, "test-time augmentation"),
    ("dataset-number", {"dataset": 7}, "not a string"),
    ("more-classes-than-outputs", {"num_classes": 4, "class_names": [*CLASSES, "dog"]},
     "'head.weight' has shape [3, 8], the model needs [4, 8]"),
    ("rgb-for-gray-weights", {"in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}, "'features.0.weight'"),
    ("other-widths", {"model_args": {"widths": [4, 16]}}, "the model needs"),
    ("unbuildable-args", {"model_args": {"widths": [-1]}}, "does not describe a buildable model"),
    ("unknown-arg", {"model_args": {"depth": 9}}, "unexpected keyword argument 'depth'"),
    ("other-architecture", {"architecture": "simple", "model_args": {}}, "tensor(s) missing"),
]


@pytest.mark.parametrize("changes, fragment", [case[1:] for case in BAD_META], ids=[case[0] for case in BAD_META])
def test_bad_model_json_is_one_clear_error(changes: dict, fragment: str, run: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    edit_meta(run, **changes)
    assert fragment in load_error(run)
    assert fragment in usage_error(["evaluate", str(run)], capsys)


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "must hold a JSON object"),
    ("[" * 100_000, "not valid JSON"),
    ("", "not valid JSON"),
], ids=["syntax", "array", "deeply-nested", "empty"])
def test_model_json_that_is_not_an_object(text: str, fragment: str, run: Path, images: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    (run / MODEL_META).write_text(text)
    assert fragment in load_error(run)
    assert fragment in usage_error(["predict", str(run), str(images)], capsys)


@pytest.mark.parametrize("signed", [False, True], ids=["old-sha256", "new-sha256"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_are_refused(damage: str, signed: bool, run: Path, capsys: pytest.CaptureFixture) -> None:
    weights = run / MODEL_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"")
    if signed:
        resign(run)
    fragment = "not a valid safetensors file" if signed else "does not match the sha256"
    assert fragment in load_error(run)
    assert fragment in usage_error(["export", str(run)], capsys)


def test_renamed_tensors_are_refused(run: Path) -> None:
    """A valid safetensors file with the right sha256 but another network's tensor names."""
    state = Classifier.load(run).model.state_dict()
    save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, str(run / MODEL_FILE))
    resign(run)
    assert "tensor(s) missing" in load_error(run)


def test_missing_files(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (run / MODEL_FILE).unlink()
    assert f"holds no {MODEL_FILE}" in load_error(run)
    assert "does not exist" in load_error(tmp_path / "no-such-run")
    (run / MODEL_META).unlink()
    assert f"holds no {MODEL_META}" in usage_error(["evaluate", str(run)], capsys)


def test_untampered_run_loads(run: Path) -> None:
    """Control for the tests above: the copy they damage loads and classifies."""
    classifier = Classifier.load(run)
    assert classifier.class_names == CLASSES
    assert len(classifier.predict(torch.zeros(2, 1, 12, 12, dtype=torch.uint8))) == 2
