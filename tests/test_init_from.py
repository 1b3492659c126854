"""Starting from trained weights (models/init.py): a previous run's, and torchvision's pretrained
ones, all without a network: the download is tested against a resolver that fails and a server
that never answers, the rest against weights files written in a temporary torch.hub cache."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import needs_fmnist
from torch import nn

from cnnlab.card import ModelCard
from cnnlab.errors import CnnlabError, InvalidSetting
from cnnlab.models import init
from cnnlab.models.init import adapt_pretrained, init_from_run, pretrained_torchvision
from cnnlab.models.registry import create_model
from cnnlab.rundir import RunDir

WIDTHS = [8, 16, 32]
RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name in torchvision's download address


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A fastnet trained for one epoch on 600 Fashion-MNIST images (a few seconds)."""
    import cnnlab

    out = tmp_path_factory.mktemp("tiny") / "run"
    return RunDir(cnnlab.train(recipe="fast", dataset="fashion-mnist", limit_train=600, epochs=1,
                               model_args={"widths": WIDTHS}, out=str(out), progress=False))


def write_run(path: Path, architecture: str, state: dict[str, torch.Tensor], class_names: list[str],
              model_args: dict | None = None, in_channels: int = 3) -> RunDir:
    """A run directory holding just the model, as training leaves it."""
    run = RunDir(path)
    run.path.mkdir()
    run.write_model(state, ModelCard(architecture=architecture, model_args=model_args or {}, class_names=class_names,
                                     in_channels=in_channels, image_size=(32, 32), mean=[0.5] * in_channels,
                                     std=[0.25] * in_channels))
    return run


def fastnet(num_classes: int, widths: list[int] = WIDTHS, in_channels: int = 1) -> nn.Module:
    return create_model("fastnet", in_channels, num_classes, widths=widths)


def start(model: nn.Module, run: RunDir, **overrides) -> str:
    card = run.read_card()
    settings = dict(architecture=card.architecture, model_args=card.model_args, in_channels=card.in_channels,
                    class_names=card.class_names)
    return init_from_run(model, run.path, **{**settings, **overrides})


# ------------------------------------------------------------ from a previous run


@needs_fmnist
def test_the_same_classes_load_every_tensor(tiny_run):
    card = tiny_run.read_card()
    model = fastnet(card.num_classes)
    message = start(model, tiny_run)
    saved = tiny_run.read_weights(card)
    assert message == f"initialised from {tiny_run} (fastnet): all {len(saved)} tensors"
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(t, saved[name]) for name, t in model.state_dict().items())


@needs_fmnist
def test_other_classes_keep_a_fresh_head(tiny_run):
    card = tiny_run.read_card()
    model = fastnet(4)
    fresh = {name: t.clone() for name, t in model.state_dict().items()}
    message = start(model, tiny_run, class_names=card.class_names[:4])
    saved = tiny_run.read_weights(card)
    assert message == (f"initialised from {tiny_run} (fastnet): {len(saved) - 2} of {len(saved)} tensors; "
                       f"the classifier head head.weight, head.bias is new (10 -> 4 classes)")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh[name] if name.startswith("head.") else saved[name]), name


@needs_fmnist
def test_other_model_args_are_refused_naming_the_difference(tiny_run):
    expected = r"differ from those .* in widths; set them to \{'widths': \[8, 16, 32\]\}"
    with pytest.raises(InvalidSetting, match=expected):
        start(fastnet(10, widths=[8, 16, 64]), tiny_run, model_args={"widths": [8, 16, 64]})


@needs_fmnist
def test_another_architecture_or_channel_count_is_refused(tiny_run):
    with pytest.raises(InvalidSetting, match="is simple, but .* was trained as fastnet; set it to fastnet") as caught:
        start(create_model("simple", 1, 10), tiny_run, architecture="simple", model_args={})
    assert caught.value.setting == "model"
    with pytest.raises(CnnlabError, match="trained on 1-channel images and these have 3"):
        start(fastnet(10, in_channels=3), tiny_run, in_channels=3)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(CnnlabError, match="holds no model.json"):
        init_from_run(fastnet(10), tmp_path, architecture="fastnet", model_args={}, in_channels=1,
                      class_names=list("abcdefghij"))


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path):
    # what another cnnlab version's fastnet would leave: same name, other shapes
    run = write_run(tmp_path / "run", "fastnet", fastnet(6, widths=[8, 16, 64]).state_dict(), list("abcdef"),
                    {"widths": WIDTHS}, in_channels=1)
    with pytest.raises(CnnlabError, match=r"does not fit fastnet .*'features.14.weight' has shape \[64, 16, 3, 3\]"):
        start(fastnet(4), run, class_names=list("abcd"))


@pytest.fixture(scope="module")
def tv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict[str, torch.Tensor]]:
    """An untrained tv:resnet18 for six classes, saved as a run, with its weights."""
    trained = create_model("tv:resnet18", 3, 6).state_dict()
    return write_run(tmp_path_factory.mktemp("tv") / "run", "tv:resnet18", trained, list("abcdef")), trained


@pytest.mark.parametrize("classes,expected", [
    (list("abcdef"), "all 122 tensors"),
    (list("fedcba"), "120 of 122 tensors; the classifier head fc.weight, fc.bias is new "
                     "(the 6 classes differ in name or order)"),
    (list("abcd"), "120 of 122 tensors; the classifier head fc.weight, fc.bias is new (6 -> 4 classes)"),
])
def test_a_torchvision_run(tv_run, classes, expected):
    run, trained = tv_run
    model = create_model("tv:resnet18", 3, len(classes))
    fresh = {name: t.clone() for name, t in model.state_dict().items()}
    assert start(model, run, class_names=classes) == f"initialised from {run} (tv:resnet18): {expected}"
    for name, tensor in model.state_dict().items():
        new = name.startswith("fc.") and classes != list("abcdef")
        assert torch.equal(tensor, fresh[name] if new else trained[name]), name


# ------------------------------------------------------------ torchvision's pretrained weights


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache; its checkpoints folder is returned."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name resolution fails at once, as on a machine without a network."""
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", fail)


def test_missing_weights_without_a_network_fail_fast_in_one_sentence(hub, monkeypatch):
    no_dns(monkeypatch)
    began = time.perf_counter()
    with pytest.raises(InvalidSetting) as caught:
        pretrained_torchvision("resnet18", 3, 4)
    assert time.perf_counter() - began < 5
    assert str(caught.value) == (f"pretrained needs tv:resnet18's weights, which are not in {hub} ({RESNET18_FILE}) "
                                 "and cannot be downloaded (no network); copy the file there or train without them.")
    assert list(hub.iterdir()) == []  # no partial download left behind


def test_a_server_that_never_answers_times_out(hub, monkeypatch):
    # a listening socket that never accepts: the connection opens and the TLS handshake waits forever
    silent = socket.create_server(("127.0.0.1", 0))
    address = silent.getsockname()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address)])
    monkeypatch.setattr(init, "DOWNLOAD_TIMEOUT_S", 0.5)
    began = time.perf_counter()
    try:
        with pytest.raises(InvalidSetting, match=r"cannot be downloaded \(no network\)"):
            pretrained_torchvision("tv:resnet18", 3, 4)
    finally:
        silent.close()
    assert time.perf_counter() - began < 10
    assert socket.getdefaulttimeout() is None  # the limit applied to the download only


def test_cached_weights_are_loaded_and_adapted_to_grey_images(hub, monkeypatch):
    no_dns(monkeypatch)  # proves nothing is downloaded
    hub.mkdir(parents=True)
    imagenet = torchvision.models.get_model("resnet18", weights=None).state_dict()  # stands in for the real file
    torch.save(imagenet, hub / RESNET18_FILE)
    model, mean, std = pretrained_torchvision("resnet18", 1, 4)
    assert mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"].sum(dim=1, keepdim=True))
    assert model.fc.out_features == 4
    kept = {name: t for name, t in model.state_dict().items() if not name.startswith(("fc.", "conv1."))}
    assert all(torch.equal(t, imagenet[name]) for name, t in kept.items())
    assert pretrained_torchvision("resnet18", 3, 4)[1:] == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_a_damaged_cached_file_is_named(hub):
    hub.mkdir(parents=True)
    (hub / RESNET18_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidSetting, match=f"needs {hub / RESNET18_FILE}, which is damaged .*; delete it"):
        pretrained_torchvision("resnet18", 3, 4)


def test_unknown_names_and_bad_arguments_are_one_sentence():
    with pytest.raises(CnnlabError, match="torchvision has no classification model 'resnet-18'"):
        pretrained_torchvision("resnet-18", 3, 4)
    with pytest.raises(CnnlabError, match="Cannot build tv:vit_b_16 with its pretrained weights: .*image_size"):
        pretrained_torchvision("vit_b_16", 3, 4, image_size=64)


@pytest.mark.parametrize("name,head,in_channels", [
    ("resnet18", "fc", 1), ("resnet18", "fc", 3), ("mobilenet_v3_small", "classifier.3", 1),
    ("squeezenet1_1", "classifier.1", 1),  # squeezenet ends in a 1x1 convolution, not a linear layer
])
def test_adapt_pretrained(name, head, in_channels):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    before = {key: t.clone() for key, t in model.state_dict().items()}
    first = next(key for key, m in model.named_modules() if isinstance(m, nn.Conv2d))
    adapt_pretrained(model, in_channels, 5)
    with torch.no_grad():
        assert model(torch.rand(2, in_channels, 32, 32)).shape == (2, 5)
    assert model.get_submodule(head).weight.shape[0] == 5
    rgb = before[f"{first}.weight"]
    folded = rgb.sum(dim=1, keepdim=True) if in_channels == 1 else rgb
    assert torch.equal(model.get_submodule(first).weight, folded)
    after = model.state_dict()
    assert all(torch.equal(after[key], t) for key, t in before.items() if not key.startswith((f"{head}.", f"{first}.")))


@needs_fmnist
def test_pretrained_training_normalises_as_the_weights_were_trained():
    """--pretrained: the data are normalised with the weights' ImageNet statistics (averaged over
    RGB for grayscale images), not the training images' own; recorded in model.json through them."""
    from cnnlab.training import distributed
    from cnnlab.training.config import make_config
    from cnnlab.training.setup import load_training_data

    config = make_config(model="tv:resnet18", pretrained=True, limit_train=100, epochs=1, progress=False)
    data = load_training_data(config, distributed.SINGLE, torch.device("cpu"))
    assert data.mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert data.std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    plain = load_training_data(make_config(model="tv:resnet18", limit_train=100, epochs=1, progress=False),
                               distributed.SINGLE, torch.device("cpu"))
    assert plain.mean != data.mean
