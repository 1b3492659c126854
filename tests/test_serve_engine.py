"""What runs the model behind `cnnlab serve`: onnxruntime on the graph exported at start-up, or
PyTorch; `auto`'s fall-backs; and where the server decodes uploads (event loop or worker thread)."""

from __future__ import annotations

import asyncio
import io
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import running_server
from torch import nn

from cnnlab.card import ModelCard
from cnnlab.deploy.engine import OnnxEngine, TorchEngine, load_engine
from cnnlab.deploy.service import INLINE_PIXELS, ModelService
from cnnlab.deploy.uploads import Upload
from cnnlab.errors import CnnlabError, InvalidSetting
from cnnlab.images.tensors import read_image
from cnnlab.models.classifier import Classifier


def test_onnxruntime_answers_as_pytorch_does_on_real_images(fmnist_run, fmnist_test_images):
    classifier = Classifier.load(fmnist_run)
    paths, _ = fmnist_test_images
    images = torch.stack([classifier.fit(read_image(p)) for p in paths])
    auto, note = load_engine(classifier, "auto")
    assert isinstance(auto, OnnxEngine) and note is None  # the CPU default when onnxruntime is installed
    torch_engine, _ = load_engine(classifier, "torch")
    assert isinstance(torch_engine, TorchEngine)
    got, expected = auto(images), torch_engine(images)
    assert got.shape == expected.shape == (len(paths), len(classifier.class_names))
    assert float((got - expected).abs().max()) <= 1e-5
    assert torch.equal(got.argmax(1), expected.argmax(1))
    for batch in (1, 3):  # the graph's batch axis is dynamic
        assert torch.allclose(auto(images[:batch]), expected[:batch], atol=1e-5)


class DataDependent(nn.Module):
    """A user's network that torch.export cannot trace: a Python branch on the data."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 10:
            return self.fc(x.flatten(1)) * 2
        return self.fc(x.flatten(1))


def data_dependent_classifier() -> Classifier:
    card = ModelCard(architecture="mine.py:DataDependent", model_args={}, class_names=["a", "b", "c"],
                     in_channels=1, image_size=(28, 28), mean=[0.5], std=[0.25], tta="none")
    return Classifier(DataDependent(), card)


def test_auto_serves_with_pytorch_a_network_that_does_not_export(capfd):
    classifier = data_dependent_classifier()
    engine, note = load_engine(classifier, "auto")
    assert isinstance(engine, TorchEngine)
    assert note.startswith("PyTorch cannot export this network to ONNX")
    assert "\n" not in note
    printed = capfd.readouterr()
    assert printed.out == printed.err == ""  # torch.export's warnings and graph dumps are not the user's concern
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert engine(images).sum(1).allclose(torch.ones(2))
    with pytest.raises(CnnlabError, match="PyTorch cannot export this network"):
        load_engine(classifier, "onnxruntime")  # asked for by name: an error, not a silent fall-back


def test_without_onnxruntime_auto_uses_pytorch_and_says_how_to_speed_up(fmnist_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    classifier = Classifier.load(fmnist_run)
    engine, note = load_engine(classifier, "auto")
    assert isinstance(engine, TorchEngine)
    assert "pip install 'cnnlab[export]'" in note
    with pytest.raises(ImportError):  # the CLI turns it into its one line naming the extra
        load_engine(classifier, "onnxruntime")


def test_an_unknown_engine_is_refused(fmnist_run):
    with pytest.raises(InvalidSetting, match="engine must be one of auto, torch, onnxruntime"):
        load_engine(Classifier.load(fmnist_run), "tensorrt")


def test_the_server_reports_its_engine(fmnist_run, fmnist_test_images):
    png = fmnist_test_images[0][0].read_bytes()
    answers = {}
    for engine in ("auto", "torch"):
        with running_server(fmnist_run, "--engine", engine) as url:
            model = httpx.get(f"{url}/v1/model", timeout=60).json()
            metadata = httpx.get(f"{url}/v2/models/{model['name']}", timeout=60).json()
            info = [line for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines()
                    if line.startswith("cnnlab_model_info")]
            answer = httpx.post(f"{url}/v1/predict", files={"files": ("x.png", png, "image/png")}, timeout=60)
            answers[engine] = answer.json()["predictions"][0]["predictions"]
        expected = "onnxruntime" if engine == "auto" else "torch"
        assert model["engine"] == expected
        assert f'engine="{expected}"' in info[0]
        assert metadata["platform"] == ("onnxruntime_onnx" if engine == "auto" else "pytorch")
    assert [p["label"] for p in answers["auto"]] == [p["label"] for p in answers["torch"]]
    for a, b in zip(answers["auto"], answers["torch"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_small_uploads_decode_in_the_event_loop_and_large_ones_in_a_worker_thread(fmnist_run, monkeypatch):
    service = ModelService(fmnist_run, max_batch=8, max_wait_ms=0, top_k=3, max_bytes=10_000_000,
                           max_pixels=40_000_000, max_queue=4, device="cpu", engine="torch")
    threads: list[str] = []
    decode = service._decode

    def noting_thread(*args):
        threads.append(threading.current_thread().name)
        return decode(*args)

    monkeypatch.setattr(service, "_decode", noting_thread)
    side = int(INLINE_PIXELS ** 0.5)
    small, large = [Upload("a.png", png(28)), Upload("b.png", png(side))], [Upload("c.png", png(side + 1))]

    async def both() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return await service.decode(small[:1]), await service.decode(large)

    loop_thread = threading.current_thread().name
    got_small, got_large = asyncio.run(both())
    assert threads == [loop_thread, threads[1]] and threads[1] != loop_thread
    # either way the images are the same as the synchronous path decodes them
    assert torch.equal(got_small[0], service.prepare(small[:1])[0])
    assert torch.equal(got_large[0], service.prepare(large)[0])
    assert asyncio.run(service.decode(small)) and threads[-1] != loop_thread  # 28² + side² > INLINE_PIXELS
