"""Export to ONNX and TorchScript, and the torch-free onnxruntime classifier, on a real Fashion-MNIST model."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from notorch import BLOCK_TORCH
from PIL import Image

from cnnlab.cli import main as cnnlab_main
from cnnlab.data.batches import Normalize
from cnnlab.deploy import export
from cnnlab.deploy.onnx_runtime import OnnxClassifier
from cnnlab.errors import CnnlabError, DatasetNotFound
from cnnlab.images.arrays import read_image, to_channels
from cnnlab.images.spec import UnreadableImage
from cnnlab.images.tensors import read_image as torch_read_image
from cnnlab.models.classifier import Classifier
from cnnlab.models.registry import create_model
from cnnlab.rundir import RunDir

TOLERANCE = 1e-4


def cnnlab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300)


def png_batch(paths: list[Path]) -> torch.Tensor:
    """The PNG files decoded by cnnlab's torch reader, as one uint8 batch."""
    return torch.stack([torch_read_image(p) for p in paths])


@pytest.fixture(scope="module")
def run_copy(fmnist_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the trained run, so exports here leave the shared run directory as it was."""
    return Path(shutil.copytree(fmnist_run, tmp_path_factory.mktemp("export") / "run"))


@pytest.fixture(scope="module")
def cli_export(run_copy: Path) -> str:
    """`cnnlab export RUN --format onnx` in a real subprocess; its stdout."""
    result = cnnlab_cli("export", str(run_copy), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def classifier(run_copy: Path) -> Classifier:
    return Classifier.load(run_copy)


# ---------------------------------------------------------------- ONNX

def test_cli_export_writes_a_checked_onnx_file(cli_export: str, run_copy: Path) -> None:
    assert (run_copy / "model.onnx").is_file()
    match = re.search(r"checked on (\d+) fashion-mnist test images: max \|logit difference\| (\S+) <= 1e-04", cli_export)
    assert match, cli_export
    assert int(match.group(1)) == 256 and float(match.group(2)) <= TOLERANCE


def test_onnx_logits_match_pytorch_with_tta(cli_export: str, run_copy: Path, classifier: Classifier,
                                            fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    assert classifier.card.tta == "flip"  # so this compares the mirrored views too
    batch = png_batch(fmnist_test_images[0])
    onnx_logits = OnnxClassifier.load(run_copy).logits(batch.numpy())
    torch_logits = classifier.logits(batch).numpy()
    assert onnx_logits.shape == (64, 10)
    assert np.abs(onnx_logits - torch_logits).max() <= TOLERANCE


@pytest.mark.parametrize("n", [1, 7])
def test_onnx_batch_axis_is_dynamic(cli_export: str, run_copy: Path, classifier: Classifier,
                                    fmnist_test_images: tuple[list[Path], list[str]], n: int) -> None:
    x = classifier.prepare(png_batch(fmnist_test_images[0][:n]))
    session = ort.InferenceSession(str(run_copy / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]
    with torch.inference_mode():
        want = classifier.model(x).numpy()
    assert got.shape == (n, 10)
    assert np.abs(got - want).max() <= TOLERANCE


def test_onnx_metadata_round_trip(cli_export: str, run_copy: Path) -> None:
    model = onnx.load(str(run_copy / "model.onnx"))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    meta = RunDir(run_copy).read_card().to_json()
    for key in ("class_names", "mean", "std", "image_size", "in_channels", "tta", "tta_flip", "architecture",
                "weights_sha256"):
        assert props[key] == meta[key], key
    assert props["cnnlab_export_format"] == 1
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [meta["in_channels"], *meta["image_size"]]
    loaded = OnnxClassifier.load(run_copy / "model.onnx")
    assert loaded.class_names == meta["class_names"]
    assert loaded.image_size == tuple(meta["image_size"]) and loaded.in_channels == meta["in_channels"]


def test_a_tampered_onnx_file_fails_the_check(cli_export: str, run_copy: Path, classifier: Classifier,
                                               fmnist_test_images: tuple[list[Path], list[str]],
                                               tmp_path: Path) -> None:
    model = onnx.load(str(run_copy / "model.onnx"))
    weights = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weights) * 1.01
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    x = classifier.prepare(png_batch(fmnist_test_images[0][:16]))
    with torch.inference_mode():
        expected = classifier.model(x).numpy()
    assert export.verify_export(run_copy / "model.onnx", "onnx", x, expected) <= TOLERANCE
    with pytest.raises(CnnlabError, match="differ from PyTorch's by"):
        export.verify_export(tampered, "onnx", x, expected)


def test_a_failed_check_writes_nothing(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "CHECK_IMAGES", 16)
    real = export.FORMATS["torchscript"]
    off_by = export.ExportFormat(real.filename, real.write, lambda path, x: real.run(path, x) + 1e-3)
    monkeypatch.setitem(export.FORMATS, "torchscript", off_by)
    out = tmp_path / "model.pt"
    out.write_bytes(b"previous export")
    with pytest.raises(CnnlabError, match=r"differ from PyTorch's by 1\.00e-03 > 1e-04.*nothing was written"):
        export.export_model(run_copy, "torchscript", out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_without_the_dataset_the_check_says_it_used_random_images(run_copy: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str, **kwargs: object) -> None:
        raise DatasetNotFound(f"Dataset {name} not found")

    monkeypatch.setattr(export, "load_dataset", missing)
    monkeypatch.setattr(export, "CHECK_IMAGES", 16)
    result = export.export_model(run_copy, "torchscript", tmp_path / "model.pt")
    assert result.checked_on == "random images (fashion-mnist is not on this machine)"
    assert result.images_checked == 16 and result.max_abs_diff <= TOLERANCE


# ---------------------------------------------------------------- TorchScript

@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(run_copy: Path, classifier: Classifier,
                                            fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    result = export.export_model(run_copy, "torchscript")
    assert result.path == run_copy / "model.torchscript.pt" and result.path.is_file()
    assert result.images_checked == 256 and result.max_abs_diff <= TOLERANCE
    assert result.checked_on == "fashion-mnist test images"
    extra = {"cnnlab.json": ""}
    module = torch.jit.load(str(result.path), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["cnnlab.json"])
    assert meta["class_names"] == classifier.class_names and meta["mean"] == classifier.card.mean
    x = classifier.prepare(png_batch(fmnist_test_images[0][:5]))
    with torch.inference_mode():
        assert (module(x) - classifier.model(x)).abs().max() <= TOLERANCE


# ---------------------------------------------------------------- architectures

def make_run(run_dir: Path, architecture: str, like: Path, images: torch.Tensor) -> Path:
    """A run directory holding an untrained `architecture` with the preprocessing of the run `like`.

    Training a ResNet even briefly takes minutes on a CPU, and export does not care whether the
    weights were trained; batch-norm statistics measured on real `images`, as training leaves
    them, keep the logits of a deep random network from collapsing to one value."""
    card = RunDir(like).read_card()
    torch.manual_seed(0)
    model = create_model(architecture, card.in_channels, card.num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batch below
    with torch.no_grad():
        model.train()(Normalize(card.mean, card.std, torch.device("cpu"), channels_last=False)(images))
    run_dir.mkdir(parents=True)
    RunDir(run_dir).write_model(model.eval().state_dict(),
                                dataclasses.replace(card, architecture=architecture, model_args={}))
    return run_dir


@pytest.mark.parametrize("architecture", ["lenet5", "vgg11-small", "resnet18-cifar"])
def test_export_works_for_registered_architectures(architecture: str, fmnist_run: Path, tmp_path: Path,
                                                   fmnist_test_images: tuple[list[Path], list[str]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "CHECK_IMAGES", 16)  # ResNet-18 is slow on a CPU
    batch = png_batch(fmnist_test_images[0][:16])
    run_dir = make_run(tmp_path / "run", architecture, like=fmnist_run, images=batch)
    result = export.export_model(run_dir)
    assert result.images_checked == 16 and result.max_abs_diff <= TOLERANCE
    batch = batch[:5]
    onnx_logits = OnnxClassifier.load(run_dir).logits(batch.numpy())
    torch_logits = Classifier.load(run_dir).logits(batch).numpy()
    assert np.ptp(torch_logits, axis=0).max() > 1e-3  # the images give different logits
    assert np.abs(onnx_logits - torch_logits).max() <= TOLERANCE


# ---------------------------------------------------------------- the torch-free runtime

TORCH_FREE_SCRIPT = BLOCK_TORCH + textwrap.dedent("""
    import json
    from cnnlab.deploy.onnx_runtime import OnnxClassifier

    classifier = OnnxClassifier.load(sys.argv[1])
    top = [p[0] for p in classifier.predict(sys.argv[2:])]
    print(json.dumps({"labels": [p.label for p in top], "probabilities": [p.probability for p in top],
                      "torch_loaded": any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules)}))
""")


def test_onnx_runtime_classifies_without_torch(cli_export: str, run_copy: Path, classifier: Classifier,
                                               fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    paths, truth = fmnist_test_images
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(run_copy), *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch_loaded"] is False
    want = [p[0] for p in classifier.predict(paths)]
    assert report["labels"] == [p.label for p in want]
    assert np.allclose(report["probabilities"], [p.probability for p in want], atol=1e-5)
    assert np.mean([a == b for a, b in zip(report["labels"], truth)]) > 0.6  # a real classifier, not noise


def test_predict_accepts_paths_pil_images_and_arrays(cli_export: str, run_copy: Path,
                                                     fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    path = fmnist_test_images[0][0]
    pixels = np.asarray(Image.open(path))
    onnx_classifier = OnnxClassifier.load(run_copy)
    want = onnx_classifier.predict(path, top_k=3)[0]
    assert len(want) == 3 and want[0].probability >= want[1].probability >= want[2].probability
    for image in (Image.open(path), pixels, pixels[..., None], pixels.astype(np.int64), pixels / 255.0):
        assert onnx_classifier.predict([image], top_k=3)[0] == want
    rgb = np.dstack([pixels] * 3)
    opaque = np.dstack([rgb, np.full_like(pixels, 255)])  # alpha 255 composites to the colour itself
    assert onnx_classifier.predict(opaque, top_k=3) == onnx_classifier.predict(rgb, top_k=3)
    with pytest.raises(CnnlabError, match="must be"):
        onnx_classifier.predict(np.zeros((2, 28, 28, 3), np.uint8))


def test_prepare_matches_classifier_bit_for_bit(cli_export: str, run_copy: Path, classifier: Classifier,
                                                fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    gray = png_batch(fmnist_test_images[0][:32])
    # a colour batch: three different real images as R, G and B, converted to grey by both sides
    colour = torch.cat([gray[:30:3], gray[1:30:3], gray[2:30:3]], dim=1)
    onnx_classifier = OnnxClassifier.load(run_copy)
    for batch in (gray, colour):
        assert np.array_equal(onnx_classifier.prepare(batch.numpy()), classifier.prepare(batch).contiguous().numpy())


def test_rgb_to_gray_matches_torchvision_for_every_colour() -> None:
    values = np.arange(256, dtype=np.uint8)
    for reds in np.array_split(values, 4):  # 2^24 colours in four slices, to bound memory
        r, g, b = np.meshgrid(reds, values, values, indexing="ij")
        batch = np.stack([r, g, b]).reshape(1, 3, len(reds) * 256, 256)
        want = TF.rgb_to_grayscale(torch.from_numpy(batch)).numpy()
        assert np.array_equal(to_channels(batch, 1), want)


def test_prepare_resizes_like_torchvision(cli_export: str, run_copy: Path, classifier: Classifier,
                                          fmnist_test_images: tuple[list[Path], list[str]]) -> None:
    small = png_batch(fmnist_test_images[0][:8])
    big = torch.from_numpy(np.stack([np.asarray(Image.fromarray(x[0].numpy()).resize((45, 61)))[None]
                                     for x in small]))
    got = OnnxClassifier.load(run_copy).prepare(big.numpy())
    want = classifier.prepare(big).contiguous().numpy()
    one_level = 1 / (255 * min(classifier.card.std))  # Pillow and torchvision round differently
    assert np.abs(got - want).max() <= one_level + 1e-6


def write_image_kinds(folder: Path, image: np.ndarray) -> list[Path]:
    """One real RGB image saved in the layouts read_image has to normalise."""
    alpha = np.tile(np.linspace(0, 255, image.shape[1], dtype=np.uint8), (image.shape[0], 1))
    gray = image[..., 0]
    files = {
        "gray.png": Image.fromarray(gray),
        "rgba.png": Image.fromarray(np.dstack([image, alpha])),
        "gray-alpha.png": Image.fromarray(np.dstack([gray, alpha])),
        "palette.png": Image.fromarray(image).quantize(16),
        "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "colour.jpg": Image.fromarray(image),
    }
    paths = []
    for name, pil in files.items():
        pil.save(folder / name)
        paths.append(folder / name)
    paletted = Image.fromarray(image).quantize(16)
    paletted.save(folder / "palette-transparent.png", transparency=3)
    rotated = Image.fromarray(image)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "rotated.jpg", exif=exif)
    frames = [Image.fromarray(image).quantize(16), Image.fromarray(255 - image).quantize(16)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    return paths + [folder / "palette-transparent.png", folder / "rotated.jpg", folder / "animated.gif"]


def test_read_image_mirrors_cnnlab_images(fmnist_test_images: tuple[list[Path], list[str]], tmp_path: Path) -> None:
    image = np.dstack([np.asarray(Image.open(p)) for p in fmnist_test_images[0][:3]])
    for path in write_image_kinds(tmp_path, image):
        got = read_image(path)
        assert got.dtype == np.uint8 and got.ndim == 3, path.name
        assert np.array_equal(got.transpose(2, 0, 1), torch_read_image(path).numpy()), path.name
    assert read_image(tmp_path / "rotated.jpg").shape[:2] == (image.shape[1], image.shape[0])


# ---------------------------------------------------------------- errors a user can cause

def test_cli_export_of_a_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cnnlab_main(["export", str(tmp_path / "nope")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:") and "does not exist" in lines[0]


def test_export_rejects_bad_format_and_unwritable_output(run_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(CnnlabError, match="Unknown export format 'keras'"):
        export.export_model(run_copy, "keras")
    with pytest.raises(CnnlabError, match="is a directory"):
        export.export_model(run_copy, "onnx", tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CnnlabError, match="Cannot write"):
        export.export_model(run_copy, "onnx", blocker / "model.onnx")


def test_onnx_classifier_load_errors(fmnist_run: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(fmnist_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.onnx")))
    with pytest.raises(CnnlabError, match=re.escape(f"run `cnnlab export {run_dir} --format onnx`")):
        OnnxClassifier.load(run_dir)
    with pytest.raises(CnnlabError, match="does not exist"):
        OnnxClassifier.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CnnlabError, match="not a valid ONNX model"):
        OnnxClassifier.load(tmp_path / "junk.onnx")


def test_onnx_without_cnnlab_metadata_is_refused(cli_export: str, run_copy: Path, tmp_path: Path) -> None:
    model = onnx.load(str(run_copy / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(CnnlabError, match="lacks the cnnlab metadata"):
        OnnxClassifier.load(tmp_path / "bare.onnx")


def test_read_image_rejects_non_images(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a PNG")
    with pytest.raises(UnreadableImage, match="notes.png is not a readable image"):
        read_image(fake)
    assert issubclass(UnreadableImage, CnnlabError)
    with pytest.raises(CnnlabError, match="does not exist"):
        read_image(tmp_path / "missing.png")
