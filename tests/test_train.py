"""End to end on real Fashion-MNIST: train -> run directory -> evaluate -> Classifier.load -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import cnnlab
from cnnlab.data.builtin import DEBIAN_FASHION_MNIST
from cnnlab.data.load import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluation.evaluate import evaluate_run
from cnnlab.rundir import RunDir

pytestmark = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST is not installed (make test installs dataset-fashion-mnist)")

METRIC_KEYS = {"epoch", "elapsed_seconds", "train_loss", "train_accuracy", "val_accuracy", "lr"}
SUMMARY_KEYS = {"test_accuracy", "best_val_accuracy", "train_seconds", "epochs", "images_per_second", "params",
                "dataset", "model"}
META_KEYS = {"architecture", "model_args", "num_classes", "class_names", "in_channels", "image_size", "mean", "std",
             "dataset", "cnnlab_version", "weights_sha256"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "fmnist"
    return cnnlab.train(dataset="fashion-mnist", limit_train=5000, epochs=3, batch_size=128, lr=0.1, seed=1,
                        val_split=0.1, model_args={}, out=str(out), progress=False)


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", val_split=0.0)


def test_run_directory_contract(run_dir: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json", "checkpoint.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert records[0]["elapsed_seconds"] < records[-1]["elapsed_seconds"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["epochs"] == 3 and summary["dataset"] == "fashion-mnist" and summary["model"] == "fastnet"
    meta = json.loads((run_dir / "model.json").read_text())
    assert META_KEYS <= set(meta)
    assert meta["num_classes"] == 10 and meta["in_channels"] == 1 and meta["image_size"] == [28, 28]
    assert meta["class_names"][0] == "T-shirt/top"
    assert 0.2 < meta["mean"][0] < 0.4 and 0.25 < meta["std"][0] < 0.45  # measured on the training split
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["limit_train"] == 5000 and config["epochs"] == 3 and config["seed"] == 1
    state = RunDir(run_dir).read_checkpoint()
    assert state["epochs_done"] == 3 and state["step"] == 0 and "optimizer" in state and "loader" in state


def test_evaluate_far_above_chance_and_matches_summary(run_dir: Path) -> None:
    report = evaluate_run(run_dir, progress=False)
    assert report["images"] == 10000
    assert report["accuracy"] > 0.75  # chance is 0.10
    assert report["top5_accuracy"] >= report["accuracy"]
    assert len(report["per_class"]) == 10 and sum(r["support"] for r in report["per_class"]) == 10000
    matrix = torch.tensor(report["confusion_matrix"])
    assert matrix.sum() == 10000 and matrix.trace().item() / 10000 == pytest.approx(report["accuracy"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"], abs=2e-4)
    assert json.loads((run_dir / "eval.json").read_text())["accuracy"] == report["accuracy"]


def test_evaluate_val_split_is_the_held_out_one(run_dir: Path) -> None:
    report = evaluate_run(run_dir, split="val", progress=False)
    assert report["images"] == 6000  # 10% of 60k, the same seeded hold-out as training


def test_classifier_predicts_files_pil_and_tensors_alike(run_dir: Path, fmnist, tmp_path: Path) -> None:
    clf = cnnlab.Classifier.load(run_dir)
    images, labels = fmnist.test.images[:64], fmnist.test.labels[:64]
    from_tensor = clf.predict(images, top_k=3)
    paths = []
    for i in range(8):
        path = tmp_path / f"image {i}.png"
        Image.fromarray(images[i, 0].numpy()).save(path)
        paths.append(path)
    from_files = clf.predict([str(p) for p in paths], top_k=3)
    from_pil = clf.predict([Image.open(p) for p in paths], top_k=3)
    for a, b, c in zip(from_tensor[:8], from_files, from_pil):
        assert [p.label for p in a] == [p.label for p in b] == [p.label for p in c]
        assert a[0].probability == pytest.approx(b[0].probability, abs=1e-5)
    for preds in from_tensor:
        assert len(preds) == 3 and preds[0].probability >= preds[1].probability >= preds[2].probability
        assert sum(p.probability for p in preds) <= 1 + 1e-5
    correct = sum(p[0].index == int(y) for p, y in zip(from_tensor, labels))
    assert correct / 64 > 0.7
    # An RGB photo of another size is converted and resized by the stored preprocessing.
    rgb = Image.fromarray(images[0, 0].numpy()).convert("RGB").resize((56, 56))
    assert clf.predict(rgb)[0][0].label == from_tensor[0][0].label


def test_tampered_weights_are_refused(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.json", "model.safetensors"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match="sha256"):
        cnnlab.Classifier.load(copy)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    kw = dict(dataset="fashion-mnist", limit_train=600, epochs=1, batch_size=100, seed=3, progress=False)
    a = cnnlab.train(out=str(tmp_path / "a"), **kw)
    b = cnnlab.train(out=str(tmp_path / "b"), **kw)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model", ["simple", "lenet5"])
def test_other_architectures_train(model: str, tmp_path: Path) -> None:
    run = cnnlab.train(dataset="fashion-mnist", model=model, limit_train=2000, epochs=2, out=str(tmp_path / model),
                       progress=False, optimizer="adamw", lr=0.004)
    assert json.loads((run / "summary.json").read_text())["test_accuracy"] > 0.5


def test_ema_tta_and_progressive_resizing(tmp_path: Path) -> None:
    """The recipe levers together: the saved model is the averaged one, TTA is recorded in
    model.json and applied by evaluate exactly as by training's own test pass."""
    run = cnnlab.train(dataset="fashion-mnist", limit_train=1500, epochs=2, batch_size=100, lr=0.1, val_split=0.0,
                       ema_decay=0.9, tta="flip-translate", low_res=20, low_res_epochs=1, eval_test=True,
                       model_args={"widths": [16, 32, 64]}, out=str(tmp_path / "run"), progress=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["tta"] == "flip-translate" and meta["tta_flip"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_accuracy"] is None for r in records) and records[-1]["test_accuracy"] > 0.3
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_run(run, progress=False)["accuracy"] == pytest.approx(summary["test_accuracy"], abs=2e-4)
    state = RunDir(run).read_checkpoint()
    averaged = cnnlab.Classifier.load(run).model.state_dict()
    raw = state["model"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())


def test_whitened_first_layer_decorrelates_patches_and_stays_frozen(fmnist, tmp_path: Path) -> None:
    from torch.nn.functional import unfold

    from cnnlab.models.registry import create_model
    from cnnlab.models.whitening import whiten_first_conv

    images = (fmnist.train.images[:2000].float() / 255 - 0.286) / 0.353
    model = create_model("fastnet", 1, 10)
    assert whiten_first_conv(model, images.split(300)) == 18  # 9 components of 3x3 grey patches, +/-
    conv = model.features[0]
    assert not conv.weight.requires_grad
    # the filters' responses to the image patches are decorrelated, each with variance
    # lambda / (lambda + eps) for its component's variance lambda: about 1 for strong ones
    patches = unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    responses = patches @ conv.weight[:9].reshape(9, 9).double().T
    cov = responses.T @ responses / len(responses)
    strength = torch.linalg.eigvalsh(patches.T @ patches / len(patches))
    assert torch.allclose(cov.diagonal(), strength / (strength + 1e-2), atol=1e-4)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-4
    assert torch.equal(conv.weight[9:18], -conv.weight[:9])
    # through a real training run the first layer keeps its pairs: it was never trained
    run = cnnlab.train(dataset="fashion-mnist", limit_train=1024, epochs=1, whiten=True, out=str(tmp_path / "w"),
                       progress=False)
    weights = saved_weights(run)
    first, pairs = weights["features.0.weight"], weights["features.0.weight"].shape[0] // 2  # 8 pairs in `fast`
    assert torch.equal(first[pairs:2 * pairs], -first[:pairs]) and first[:pairs].abs().sum() > 0
    later = weights["features.4.weight"]
    assert not torch.equal(later[pairs:2 * pairs], -later[:pairs])


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run / "model.safetensors"))


def test_translate_off_epochs_trains_the_last_epochs_unshifted(tmp_path: Path) -> None:
    common = dict(dataset="fashion-mnist", model="lenet5", precision="fp32", limit_train=512, epochs=1, batch_size=128,
                  flip="off", whiten=False, translate_off_epochs=0, progress=False)
    plain = cnnlab.train(**common, translate=0, out=str(tmp_path / "plain"))
    off = cnnlab.train(**{**common, "translate_off_epochs": 1}, translate=2, out=str(tmp_path / "off"))
    shifted = cnnlab.train(**common, translate=2, out=str(tmp_path / "shifted"))
    w = {name: saved_weights(run) for name, run in [("plain", plain), ("off", off), ("shifted", shifted)]}
    assert all(torch.equal(w["plain"][k], w["off"][k]) for k in w["plain"])
    assert not all(torch.equal(w["plain"][k], w["shifted"][k]) for k in w["plain"])
