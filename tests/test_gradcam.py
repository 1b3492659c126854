"""Grad-CAM against ground truth: heat on the region that decides the class, for every
architecture, and `cnnlab explain` in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnlab
from cnnlab.errors import CnnlabError
from cnnlab.images.tensors import read_image
from cnnlab.insight.gradcam import explain_files, find_target_layer, gradcam, overlay
from cnnlab.models.classifier import Classifier
from cnnlab.models.registry import create_model, list_models

SIDE, HALF, SHAPE = 32, 16, 9  # image side, quadrant side, side of the drawn shapes (pixels)
CLASSES = ("cross", "ring", "none")


def _shape(kind: str) -> np.ndarray:
    mask = np.zeros((SHAPE, SHAPE), bool)
    if kind == "cross":
        mask[SHAPE // 2, :] = mask[:, SHAPE // 2] = True
    elif kind == "ring":
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    else:  # the distractor: a filled square
        mask[2:-2, 2:-2] = True
    return mask


def _synthetic_image(rng: np.random.Generator, cls: str) -> tuple[np.ndarray, int, int]:
    """Noise with a class shape in one random quadrant and a distractor square in another.

    "none" images carry a second square instead: a class without a shape of its own, so the
    model cannot read "cross" as "no ring" and has to find both shapes where they are.
    Returns the image and the quadrants (0-3, row-major) of the evidence and the distractor.
    """
    image = rng.integers(0, 110, (SIDE, SIDE)).astype(np.uint8)
    evidence, distractor = rng.choice(4, 2, replace=False)
    for quadrant, kind in ((evidence, "square" if cls == "none" else cls), (distractor, "square")):
        top = (quadrant // 2) * HALF + rng.integers(1, HALF - SHAPE + 1)
        left = (quadrant % 2) * HALF + rng.integers(1, HALF - SHAPE + 1)
        image[top:top + SHAPE, left:left + SHAPE][_shape(kind)] = 230
    return image, int(evidence), int(distractor)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Path, str, int, int]]]:
    """A fastnet trained on 900 synthetic images in ImageFolder layout, and the 150 test images
    as (path, class, evidence quadrant, distractor quadrant)."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    test = []
    for split, count in (("train", 900), ("test", 150)):
        for i in range(count):
            cls = CLASSES[i % 3]
            image, evidence, distractor = _synthetic_image(rng, cls)
            path = root / split / cls / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(path)
            if split == "test":
                test.append((path, cls, evidence, distractor))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        # no flips or shifts: the quadrant of each test image must stay the one recorded
        run = cnnlab.train(dataset=f"folder:{root}", model="fastnet",
                           model_args={"widths": [16, 32, 64]}, epochs=4, batch_size=64, flip="off", translate=0,
                           val_split=0, tta="none", out=str(root / "run"), progress=False)
    return run, test


def _quadrant_mass(heat: torch.Tensor) -> torch.Tensor:
    """(N, 4): the share of each heat map's total in each quadrant."""
    quadrants = heat.unflatten(1, (2, HALF)).unflatten(3, (2, HALF)).sum(dim=(2, 4)).flatten(1)
    return quadrants / quadrants.sum(1, keepdim=True).clamp_min(1e-12)


def test_heat_maps_lie_on_the_evidence_not_on_the_distractor(shapes_run) -> None:
    run, test = shapes_run
    classifier = Classifier.load(run)
    images = torch.stack([read_image(path) for path, *_ in test])
    labels = torch.tensor([classifier.class_names.index(cls) for _, cls, *_ in test])
    x = classifier.prepare(images)
    with torch.no_grad():
        accuracy = (classifier.model(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95  # it learned the shapes, so there is something true to explain

    # "none" has no evidence of its own to find; explain the two classes with a shape
    shaped = torch.tensor([cls != "none" for _, cls, *_ in test])
    mass = _quadrant_mass(gradcam(classifier.model, x[shaped], target=labels[shaped]))
    rows = torch.arange(len(mass))
    evidence = torch.tensor([e for (_, cls, e, _) in test if cls != "none"])
    distractor = torch.tensor([d for (_, cls, _, d) in test if cls != "none"])
    on_evidence, on_distractor = mass[rows, evidence].mean().item(), mass[rows, distractor].mean().item()
    print(f"Grad-CAM heat on the evidence quadrant {on_evidence:.3f}, on the distractor {on_distractor:.3f}")
    # Chance is 0.25 a quadrant; the square is as bright as the shapes, so heat that followed
    # brightness rather than evidence would split about evenly between the two.
    assert on_evidence > 0.5
    assert on_evidence > 2 * on_distractor


MODELS = list_models() + ["tv:resnet18", "tv:mobilenet_v3_small"]


def _map_size(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    sizes = []
    handle = layer.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return sizes[-1]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,side", [(1, 28), (3, 32)])
def test_every_architecture_gets_full_size_maps_and_is_left_as_it_was(name: str, channels: int, side: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, channels, 5)
    trainable = [p.requires_grad for p in model.parameters()]  # airnet's norms have a frozen scale
    x = torch.randn(3, channels, side, side)
    height, width = _map_size(model, find_target_layer(model, x), x)
    assert height * width > 1  # something to localise

    model.train()
    heat = gradcam(model, x)
    assert heat.shape == (3, side, side) and heat.dtype == torch.float32
    assert torch.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert all(p.grad is None for p in model.parameters())


def test_the_chosen_layer_is_the_last_convolutional_stage() -> None:
    fastnet = create_model("fastnet", 1, 10)
    assert find_target_layer(fastnet) is fastnet.features  # after the last conv's norm and activation
    resnet = create_model("resnet18-cifar", 3, 10)
    assert find_target_layer(resnet) is resnet.layer4  # the residual sum, not a conv inside the block
    simple = create_model("simple", 1, 10)
    assert find_target_layer(simple) is simple[4]  # the ReLU after the last conv, before pooling
    # vgg11-small's last convolutions are 1x1 on 28x28 images: the stage before them is used
    vgg, x = create_model("vgg11-small", 1, 10), torch.zeros(1, 1, 28, 28)
    layer = find_target_layer(vgg, x)
    assert isinstance(layer, torch.nn.ReLU) and _map_size(vgg, layer, x) == (3, 3)


def test_targets_inference_mode_and_bad_targets() -> None:
    torch.manual_seed(0)
    model = create_model("fastnet", 1, 4, widths=(8, 16, 32)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():  # as callers that only predict run; Grad-CAM still needs gradients
        per_image = gradcam(model, x, target=[1, 3])
    assert torch.allclose(per_image[0], gradcam(model, x[:1], target=1)[0], atol=1e-5)
    with pytest.raises(CnnlabError, match="between 0 and 3"):
        gradcam(model, x, target=4)
    with pytest.raises(CnnlabError, match="one target class per image"):
        gradcam(model, x, target=[0, 1, 2])


def test_overlay_colours_grey_and_colour_images() -> None:
    grey = torch.full((1, 8, 8), 128, dtype=torch.uint8)
    heat = torch.zeros(8, 8)
    heat[:, 4:] = 1.0
    blended = overlay(grey, heat)
    assert blended.shape == (8, 8, 3) and blended.dtype == np.uint8
    cold, hot = blended[0, 0].astype(int), blended[0, 7].astype(int)
    assert cold[2] > cold[0] and hot[0] > hot[2]  # jet: blue where the heat is 0, red where it is 1
    colour = np.zeros((3, 16, 16), np.uint8)
    assert overlay(colour, np.ones((4, 4))).shape == (16, 16, 3)  # a coarse map is resized to the image


def cnnlab_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ})


def test_explain_cli_writes_one_figure_per_image(fmnist_run: Path, fmnist_test_images, tmp_path: Path) -> None:
    paths, _ = fmnist_test_images
    result = cnnlab_cli("explain", str(fmnist_run), *map(str, paths[:3]), "--out", str(tmp_path / "cams"))
    assert result.returncode == 0, result.stderr
    written = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines()]
    assert written == [tmp_path / "cams" / f"{p.stem}-gradcam.png" for p in paths[:3]]
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 150


def test_explain_default_folder_and_same_names(fmnist_run: Path, fmnist_test_images, tmp_path: Path) -> None:
    paths, _ = fmnist_test_images
    twin = tmp_path / "other" / paths[0].name  # the same file name in another folder
    twin.parent.mkdir()
    twin.write_bytes(paths[0].read_bytes())
    written = explain_files(fmnist_run, [paths[0], twin])
    assert written == [fmnist_run / "explain" / f"{paths[0].stem}-gradcam.png",
                       fmnist_run / "explain" / f"{paths[0].stem}-2-gradcam.png"]
    assert all(p.is_file() for p in written)


def test_explain_cli_unreadable_image_is_one_line(fmnist_run: Path, fmnist_test_images, tmp_path: Path) -> None:
    paths, _ = fmnist_test_images
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    out = tmp_path / "cams"
    result = cnnlab_cli("explain", str(fmnist_run), str(paths[0]), str(broken), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error:") and "broken.png" in lines[0], result.stderr
    assert not out.exists()  # every file is read before anything is written
