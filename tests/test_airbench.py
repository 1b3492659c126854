"""The airbench pieces behind the CIFAR recipes: alternating flips, lookahead, the whitened stem's
bias trained for a few epochs, batch-norm biases at a higher rate, the decay's floor, Muon, airnet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.data.batches import BatchLoader, Normalize
from cnnlab.data.split import Split
from cnnlab.models.registry import create_model
from cnnlab.training.config import make_config
from cnnlab.training.optim import WHITEN_BIAS, Lookahead, Muon, _orthogonalise, make_optimizer, make_schedule


def _loader(n: int = 64, **kw) -> BatchLoader:
    # image i is a left-to-right ramp whose first pixel is i: a mirrored copy is recognisable
    ramp = torch.arange(8, dtype=torch.uint8)[None, None, None, :] * 10
    images = (ramp + torch.arange(n, dtype=torch.uint8)[:, None, None, None]).expand(n, 1, 8, 8).contiguous()
    norm = Normalize([0.0], [1 / 255], torch.device("cpu"), channels_last=False)  # back to the raw values
    return BatchLoader(Split(images, torch.arange(n)), 16, norm, shuffle=True, flip=True, **kw)


def _mirrored(loader: BatchLoader, epoch: int) -> dict[int, bool]:
    loader.epoch = epoch
    seen = {}
    for x, labels in loader:
        for image, label in zip(x, labels.tolist()):
            seen[label] = bool(image[0, 0, 0] > image[0, 0, -1])  # the ramp runs right to left
    return seen


def test_alternating_flip_mirrors_each_image_the_other_way_every_epoch() -> None:
    loader = _loader(alternate_flip=True, seed=5)
    first, second, third = (_mirrored(loader, epoch) for epoch in (1, 2, 3))
    assert len(first) == 64 and 16 < sum(first.values()) < 48  # at random in the first epoch
    assert all(second[i] == (not first[i]) for i in range(64))  # each one the other way round
    assert third == first
    # random flipping, for contrast, mirrors some images the same way two epochs running
    plain = _loader(seed=5)
    a, b = _mirrored(plain, 1), _mirrored(plain, 2)
    assert any(a[i] == b[i] for i in range(64))


def test_alternating_flip_resumes_mid_epoch_with_the_same_batches() -> None:
    whole = _loader(alternate_flip=True, seed=2)
    whole.epoch = 2
    _ = list(_loader(alternate_flip=True, seed=2))
    first = list(whole)
    resumed = _loader(alternate_flip=True, seed=2)
    resumed.epoch = 2
    state = whole.state()
    resumed.resume_at(state, 2)
    rest = list(resumed)
    assert len(rest) == len(first) - 2
    for (a, la), (b, lb) in zip(first[2:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_lookahead_pulls_towards_the_slow_average_and_ends_on_it() -> None:
    model = nn.Linear(3, 2)
    start = model.weight.detach().clone()
    look = Lookahead(model, every=2, total_steps=6)
    with torch.no_grad():
        model.weight.add_(1.0)
    look.step()  # step 1: not a multiple of 2, nothing happens
    assert torch.equal(model.weight, start + 1)
    look.step()  # step 2: decay 0.95**5 * (2/6)**3, so the weights stay close to where they went
    decay = 0.95 ** 5 * (2 / 6) ** 3
    assert torch.allclose(model.weight, start + 1 - decay, atol=1e-6)
    saved = look.state_dict()
    with torch.no_grad():
        model.weight.add_(5.0)
    for _ in range(4):
        look.step()
    slow = look.slow[0]
    assert torch.equal(model.weight, slow)  # the last step ends on the average
    # a restored lookahead continues from the saved average, not from the live weights
    other = Lookahead(model, every=2, total_steps=6)
    other.load_state_dict(saved)
    assert other.steps == 2 and torch.allclose(other.slow[0], start + 1 - decay, atol=1e-6)


def _setup_config(**kw):
    return make_config(recipe="cifar", batch_size=256, **kw)


def test_bias_rate_whiten_bias_group_and_the_decay_floor() -> None:
    config = _setup_config()
    model = create_model("airnet", 3, 10, widths=[8, 16, 16])
    model.stem.weight.requires_grad_(False)  # as --whiten leaves it
    optimizer = make_optimizer(model, config)
    groups = {g.get("name", i): g for i, g in enumerate(optimizer.param_groups)}
    base = config.lr * config.batch_size / 256
    norm_bias = next(g for g in optimizer.param_groups if any(p is model.blocks[0].norm1.bias for p in g["params"]))
    assert norm_bias["lr"] == pytest.approx(base * 64) and norm_bias["weight_decay"] == pytest.approx(1.33e-3 / 64)
    assert groups[WHITEN_BIAS]["params"] == [model.stem.bias]
    steps = 10
    schedule = make_schedule(optimizer, config, steps)
    factors = schedule.lr_lambdas
    whiten = next(f for f, g in zip(factors, optimizer.param_groups) if g.get("name") == WHITEN_BIAS)
    other = factors[0]
    stop = config.whiten_bias_epochs * steps
    assert whiten(stop - 1) > 0 and whiten(stop) == 0 and other(stop) > 0
    assert other(config.epochs * steps) == pytest.approx(0.07)  # lr_end: the decay stops at 7% of the peak
    assert other(0) == pytest.approx(0.1)


def test_whiten_bias_trains_for_its_epochs_then_stays(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8), torch.arange(256) % 4
    run = cnnlab.train(data=data, test_data=data, model="airnet", model_args={"widths": [8, 16, 16]},
                       whiten=True, whiten_bias_epochs=1, epochs=2, batch_size=64, min_steps=0,
                       checkpoint_every_steps=0, out=str(tmp_path / "run"), progress=False)
    from safetensors.torch import load_file
    weights = load_file(str(run / "model.safetensors"))
    assert weights["stem.bias"].abs().sum() > 0  # trained from zero in epoch 1
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    whiten_group = next(g for g in state["optimizer"]["param_groups"] if g.get("name") == WHITEN_BIAS)
    assert whiten_group["lr"] == 0  # and not moved in epoch 2


def test_orthogonalise_gives_near_orthogonal_rows() -> None:
    g = torch.randn(16, 72)
    x = _orthogonalise(g, steps=5).float()
    singular = torch.linalg.svdvals(x)
    assert singular.min() > 0.5 and singular.max() < 1.3  # all near 1: the quintic iteration's band


def test_muon_trains_the_filters_at_a_fixed_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    config = make_config(recipe="none", optimizer="muon", batch_size=2000)  # Muon's own rate: MUON_LR
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, Muon)
    muon = next(g for g in optimizer.param_groups if g.get("muon"))
    assert muon["params"] == [model[0].weight]
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert model[0].weight.norm().item() == pytest.approx(8 ** 0.5, rel=0.2)


def test_muon_trains_through_the_cli_and_resumes(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (256, 1, 12, 12), dtype=torch.uint8), torch.arange(256) % 2
    run = cnnlab.train(data=data, test_data=data, optimizer="muon", epochs=1, batch_size=64,
                       model_args={"widths": [8, 16, 16]}, out=str(tmp_path / "m"), progress=False)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("size", [32, 28])
def test_airnet_shapes_and_dirac_start(size: int) -> None:
    model = create_model("airnet", 3, 10).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
    conv = model.blocks[1].conv1  # 64 -> 256: its first 64 filters pass their input through
    centre = conv.weight[:64, :, 1, 1]
    assert torch.equal(centre, torch.eye(64)) and conv.weight[:64].sum() == 64
    assert not model.blocks[0].norm1.weight.requires_grad and model.blocks[0].norm1.momentum == pytest.approx(0.4)


def _folder(root: Path, size: int, mode: str) -> Path:
    from PIL import Image
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new(mode, (size, size), color=(i * 40, 0, 0) if mode == "RGB" else i * 40).save(root / label / f"{i}.png")
    return root


def test_the_default_recipe_follows_the_images(tmp_path: Path) -> None:
    colour32 = _folder(tmp_path / "c32", 32, "RGB")
    grey32 = _folder(tmp_path / "g32", 32, "L")
    colour64 = _folder(tmp_path / "c64", 64, "RGB")
    assert make_config(dataset="cifar10").recipe == "cifar"
    assert make_config(dataset="cifar100").recipe == "cifar"
    assert make_config(dataset="fashion-mnist").recipe == "fast"
    assert make_config(dataset=f"folder:{colour32}").recipe == "cifar"
    assert make_config(dataset=f"folder:{grey32}").recipe == "fast"
    assert make_config(dataset=f"folder:{colour64}").recipe == "fast"
    assert make_config(dataset=f"folder:{tmp_path / 'missing'}").recipe == "fast"
    # a recipe or a model named by the user stands
    assert make_config(dataset="cifar10", recipe="fast").recipe == "fast"
    assert make_config(dataset="cifar10", model="fastnet").recipe == "fast"


def test_arrays_of_32x32_colour_images_get_the_cifar_recipe(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    run = cnnlab.train(data=(images, torch.arange(64) % 2), epochs=1, min_steps=0, batch_size=32,
                       model_args={"widths": [8, 8, 8]}, out=str(tmp_path / "run"), progress=False)
    import yaml
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["recipe"] == "cifar" and config["model"] == "airnet" and config["alternate_flip"] is True


def test_the_cifar_recipe_keeps_airnets_own_settings_to_airnet() -> None:
    other = make_config(recipe="cifar", model="fastnet")
    assert other.bias_lr_scale == 1.0 and not other.whiten and other.whiten_bias_epochs == 0
    assert other.model_args == {}
    own = make_config(recipe="cifar")
    assert own.bias_lr_scale == 64.0 and own.whiten and own.whiten_bias_epochs == 3
