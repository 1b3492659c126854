"""Every registered architecture, plus torchvision ones via tv:NAME, on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.registry import count_parameters, create_model, describe_model, list_models

NUM_CLASSES = 7
TV_MODELS = ["tv:resnet18", "tv:mobilenet_v3_small"]
INPUTS = [(1, 28), (3, 32)]  # (channels, side): MNIST-like and CIFAR-like


def test_registry_is_not_empty():
    names = list_models()
    assert "fastnet" in names and names == sorted(names)
    for name in names:
        assert describe_model(name)


@pytest.mark.parametrize("channels,side", INPUTS, ids=[f"{c}x{s}x{s}" for c, s in INPUTS])
@pytest.mark.parametrize("name", list_models() + TV_MODELS)
def test_forward_backward(name, channels, side):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=NUM_CLASSES)
    assert isinstance(model, nn.Module)
    model.train()
    x = torch.randn(3, channels, side, side)  # batch > 1 for batch norm in train mode
    target = torch.tensor([0, 3, NUM_CLASSES - 1])
    out = model(x)
    assert out.shape == (3, NUM_CLASSES)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, target).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for pname, p in params:
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for _, p in params)
    model.eval()
    with torch.no_grad():
        single = model(x[:1])  # eval mode takes a batch of one
    assert single.shape == (1, NUM_CLASSES) and torch.isfinite(single).all()


@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_first_conv_is_adapted_to_grayscale(name):
    model = create_model(name, in_channels=1, num_classes=NUM_CLASSES)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert create_model(name, in_channels=3, num_classes=NUM_CLASSES)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_is_a_user_error():
    with pytest.raises(CnnlabError, match="nosuchnet"):
        create_model("nosuchnet", 3, 10)


def test_unknown_torchvision_model_is_a_user_error():
    with pytest.raises(CnnlabError, match="doesnotexist"):
        create_model("tv:doesnotexist", 3, 10)


def test_bad_model_arguments_are_a_user_error():
    with pytest.raises(CnnlabError, match="fastnet"):
        create_model("fastnet", 3, 10, no_such_option=1)
    with pytest.raises(CnnlabError, match="resnet18"):
        create_model("tv:resnet18", 3, 10, no_such_option=1)


def test_fastnet_widths_are_honoured():
    model = create_model("fastnet", 1, 5, widths=(8, 16, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert convs[0].in_channels == 1
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(32, 5)]
    assert count_parameters(model) < count_parameters(create_model("fastnet", 1, 5))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    as_list = create_model("fastnet", 1, 5, widths=[8, 16, 32])  # from YAML/JSON a list arrives
    assert count_parameters(as_list) == count_parameters(model)


def test_models_are_untrained_and_independent():
    torch.manual_seed(0)
    a = create_model("fastnet", 3, 4)
    b = create_model("fastnet", 3, 4)
    assert not torch.equal(a.head.weight, b.head.weight)  # fresh random init, no shared state
