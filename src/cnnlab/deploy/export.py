"""`export_model`: a run's network as ONNX or TorchScript, checked against PyTorch before it is kept.

The plain graph is the network in float32 (normalised (N, C, H, W) input -> logits) with a dynamic
batch axis. With `preprocessing`, the ONNX graph is self-contained: uint8 images at the model's
size in, (N, H, W, C) or (N, C, H, W), normalisation and the model's test-time augmentation
inside, softmax probabilities out; OpenCV's DNN module, Triton's onnxruntime backend or
onnxruntime-web run it with nothing to re-implement. Either way class names, mean/std, image size
and test-time augmentation travel in the file's metadata, so `OnnxClassifier` works without PyTorch.
model.safetensors stays the safe format to share: loading TorchScript runs code from the file,
and PyTorch has deprecated TorchScript, so prefer ONNX for deployment.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .. import __version__
from ..card import ModelCard
from ..data.batches import Normalize
from ..data.load import load_dataset
from ..errors import CnnlabError
from ..files import atomic_write
from ..images.tensors import tta_logits
from ..models.classifier import Classifier
from ..rundir import RunDir

TOLERANCE = 1e-4  # largest |logit difference| from PyTorch fp32 an exported file may show
CHECK_IMAGES = 256  # test images the check runs, at most
CHECK_BATCH = 32  # images per forward pass in the check: bounds memory for large inputs
TORCHSCRIPT_META = "cnnlab.json"  # the _extra_files entry holding the metadata
LAYOUTS = ("nhwc", "nchw")  # a self-contained graph's input: OpenCV and PIL arrays are NHWC
PROBABILITY_TOLERANCE = 1e-5  # largest |probability difference| of a self-contained graph from PyTorch fp32


@dataclass
class ExportResult:
    path: Path
    fmt: str
    max_abs_diff: float  # largest |logit difference| from PyTorch fp32 over the checked images
    images_checked: int
    tolerance: float = TOLERANCE
    checked_on: str = ""  # which images: the run's test split, or random ones when it is unavailable


class WithPreprocessing(nn.Module):
    """uint8 images at the model's size -> class probabilities: the graph a self-contained export
    holds. The arithmetic is Normalize's and tta_logits', so it agrees with `cnnlab predict`."""

    def __init__(self, model: nn.Module, card: ModelCard, layout: str):
        super().__init__()
        self.model, self.tta, self.flip, self.nhwc = model, card.tta, card.tta_flip, layout == "nhwc"
        normalize = Normalize(card.mean, card.std, torch.device("cpu"), channels_last=False)
        self.register_buffer("scale", normalize.scale)
        self.register_buffer("shift", normalize.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) if self.nhwc else images
        x = x.float() * self.scale - self.shift
        return torch.softmax(tta_logits(self.model, x, self.tta, self.flip), dim=1)


@dataclass(frozen=True)
class ExportFormat:
    filename: str  # default name inside the run directory
    write: Callable[[nn.Module, torch.Tensor, ModelCard, Path], None]  # (model, example, card, path)
    run: Callable[[Path, torch.Tensor], np.ndarray]  # logits of the exported file for a float batch


# ---------------------------------------------------------------- the formats

def onnx_graph(model: nn.Module, example: torch.Tensor, card: ModelCard) -> onnx.ModelProto:
    """The network as an ONNX graph in memory, with the model card in its metadata."""
    # torch.export-based exporter; a batch of 2 in the example keeps torch.export from
    # specialising the batch axis to 1.
    output = "probabilities" if isinstance(model, WithPreprocessing) else "logits"
    previous = logging.root.manager.disable
    # torch.export reports a network it cannot trace with logged warnings and printed graph dumps;
    # the error below says it in one line
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=[output],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                                        external_data=False, verbose=False)
    except torch.onnx.OnnxExporterError as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0]  # without terminal colours
        raise CnnlabError(f"PyTorch cannot export this network to ONNX: {first}") from None
    finally:
        logging.disable(previous)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, card.to_properties(__version__))
    return proto


def _write_onnx(model: nn.Module, example: torch.Tensor, card: ModelCard, path: Path) -> None:
    onnx.save_model(onnx_graph(model, example, card), str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: chunk.contiguous().numpy()})[0]
                           for chunk in images.split(CHECK_BATCH)])


def _write_torchscript(model: nn.Module, example: torch.Tensor, card: ModelCard, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.* is deprecated")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(card.exported(__version__))})


def _run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.* is deprecated")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return torch.cat([module(chunk).float() for chunk in images.split(CHECK_BATCH)]).numpy()


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(RunDir.ONNX, _write_onnx, _run_onnx),
    "torchscript": ExportFormat(RunDir.TORCHSCRIPT, _write_torchscript, _run_torchscript),
}


# ---------------------------------------------------------------- the check

def check_images(run_dir: Path, classifier: Classifier) -> tuple[torch.Tensor, str]:
    """Up to CHECK_IMAGES uint8 test images of the run's dataset, and a phrase saying which images
    they are; seeded random images when the dataset is not on this machine."""
    config = RunDir(run_dir).read_config()
    name = classifier.card.dataset or config.get("dataset")
    if name:
        try:
            # no download: an export should not fetch a dataset only to check numerics
            bundle = load_dataset(name, val_split=0, image_size=config.get("image_size"), download=False,
                                  progress=False)
            return bundle.test.images[:CHECK_IMAGES], f"{name} test images"
        except (CnnlabError, OSError):
            pass
    gen = torch.Generator().manual_seed(0)
    shape = (CHECK_IMAGES, classifier.in_channels, *classifier.image_size)
    reason = f"{name} is not on this machine" if name else "the run does not record its dataset"
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen), f"random images ({reason})"


def verify_export(path: Path, fmt: str, inputs: torch.Tensor, expected: np.ndarray,
                  tolerance: float = TOLERANCE) -> float:
    """Run the exported file on normalised `inputs`; return the largest |logit difference| from
    `expected`, or raise CnnlabError when it exceeds `tolerance` (or is not finite)."""
    got = FORMATS[fmt].run(path, inputs)
    if got.shape != expected.shape:
        raise CnnlabError(f"The exported {fmt} model returns logits of shape {got.shape}, PyTorch {expected.shape}.")
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not diff <= tolerance:
        raise CnnlabError(f"The exported {fmt} model's logits differ from PyTorch's by {diff:.2e} > {tolerance:.0e} "
                          f"on {len(inputs)} images.")
    return diff


# ---------------------------------------------------------------- export

def export_model(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *,
                 preprocessing: bool = False, layout: str = "nhwc", triton: str | Path | None = None) -> ExportResult:
    """Export a run's model to `out` (default RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt).

    preprocessing (ONNX only): the self-contained graph, uint8 images in `layout` ("nhwc" or "nchw")
    at the model's size -> probabilities, normalisation and test-time augmentation inside.
    triton: also write a Triton model repository there (the ONNX file plus config.pbtxt).

    The file is written to a temporary name, checked against PyTorch fp32 on up to CHECK_IMAGES
    test images of the run's dataset (seeded random images when the dataset is not on this
    machine; `checked_on` says which), and renamed into place only when every logit (every
    probability, for a self-contained graph) agrees within tolerance; otherwise nothing is written
    and CnnlabError says by how much it differed.
    """
    if fmt not in FORMATS:
        raise CnnlabError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if (preprocessing or triton is not None) and fmt != "onnx":
        raise CnnlabError("Preprocessing in the graph and Triton repositories are for ONNX: use --format onnx.")
    if layout not in LAYOUTS:
        raise CnnlabError(f"Unknown input layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / FORMATS[fmt].filename
    if path.is_dir():
        raise CnnlabError(f"{path} is a directory; give the output file, e.g. {path / FORMATS[fmt].filename}.")
    classifier = Classifier.load(run_dir)  # safetensors + model.json, sha256-checked; CPU, eval mode
    model = classifier.model.float()

    images, checked_on = check_images(run_dir, classifier)
    images = classifier.fit(images)
    with torch.inference_mode():
        if preprocessing:  # what the served model answers: probabilities over the model's TTA views
            model = WithPreprocessing(model, classifier.card, layout).eval()
            inputs = images.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else images
            expected = torch.cat([model(chunk) for chunk in inputs.split(CHECK_BATCH)]).numpy()
            tolerance = PROBABILITY_TOLERANCE
        else:
            inputs = classifier.prepare(images)
            expected = torch.cat([model(chunk).float() for chunk in inputs.split(CHECK_BATCH)]).numpy()
            tolerance = TOLERANCE
    example = inputs[:2] if len(inputs) >= 2 else torch.zeros(2, *inputs.shape[1:], dtype=inputs.dtype)

    diffs: list[float] = []

    def write_and_check(tmp: Path) -> None:
        with torch.no_grad():
            FORMATS[fmt].write(model, example.clone(), classifier.card, tmp)
        try:
            diffs.append(verify_export(tmp, fmt, inputs, expected, tolerance))
        except CnnlabError as exc:  # atomic_write removes the temporary file
            raise CnnlabError(f"{str(exc).rstrip('.')}; nothing was written to {path}.") from None

    try:
        atomic_write(path, write_and_check)
        if triton is not None:
            write_triton_repository(Path(triton), path, classifier.card, run_dir.resolve().name, preprocessing,
                                    layout)
    except OSError as exc:
        raise CnnlabError(f"Cannot write {exc.filename or path}: {exc.strerror or exc}.") from None
    return ExportResult(path, fmt, diffs[0], len(inputs), tolerance, checked_on)


# ---------------------------------------------------------------- Triton

TRITON_MAX_BATCH = 64  # the largest batch Triton's dynamic batcher forms
TRITON_QUEUE_DELAY_US = 5000  # how long it waits for company, as `cnnlab serve --max-wait-ms 5`


def triton_config(name: str, card: ModelCard, preprocessing: bool, layout: str) -> str:
    """config.pbtxt for Triton's onnxruntime backend: the model's tensors, dynamic batching, and
    the class names (labels.txt) for Triton's classification extension."""
    h, w = card.image_size
    c = card.in_channels
    if preprocessing:
        dims, dtype, output = ([h, w, c] if layout == "nhwc" else [c, h, w]), "TYPE_UINT8", "probabilities"
    else:
        dims, dtype, output = [c, h, w], "TYPE_FP32", "logits"
    return (f'name: "{name}"\n'
            'platform: "onnxruntime_onnx"\n'
            f"max_batch_size: {TRITON_MAX_BATCH}\n"
            f'input [\n  {{\n    name: "images"\n    data_type: {dtype}\n    dims: {dims}\n  }}\n]\n'
            f'output [\n  {{\n    name: "{output}"\n    data_type: TYPE_FP32\n    dims: [ {card.num_classes} ]\n'
            '    label_filename: "labels.txt"\n  }\n]\n'
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {TRITON_QUEUE_DELAY_US}\n}}\n"
            'instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n')


def write_triton_repository(repository: Path, onnx_file: Path, card: ModelCard, name: str, preprocessing: bool,
                            layout: str) -> Path:
    """REPOSITORY/NAME/{config.pbtxt, labels.txt, 1/model.onnx}: a model Triton serves as it is."""
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "1" / RunDir.ONNX, lambda tmp: tmp.write_bytes(onnx_file.read_bytes()))
    atomic_write(folder / "labels.txt", lambda tmp: tmp.write_text("\n".join(card.class_names) + "\n"))
    atomic_write(folder / "config.pbtxt", lambda tmp: tmp.write_text(triton_config(name, card, preprocessing, layout)))
    return folder
