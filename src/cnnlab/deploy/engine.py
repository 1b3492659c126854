"""What runs the model behind `cnnlab serve`: PyTorch, or onnxruntime.

The onnxruntime engine runs the self-contained graph that `cnnlab export --with-preprocessing`
writes (uint8 images in, normalisation and the model's test-time augmentation inside, softmax
probabilities out), exported in memory when the server starts and checked against PyTorch on
seeded random images before it serves anything. On the 2-core reference CPU it runs the demo
model's lone image in 0.25 ms against PyTorch's 1.08 ms, 16 images in 2.9 ms against 4.7 ms,
64 in 11.4 against 12.9 (`python -m benchmarks engines`, BENCHMARKS.md), and it holds the GIL
for none of it, so the event loop keeps parsing requests meanwhile.

`auto` picks onnxruntime on the CPU when the `export` extra is installed and the network
exports, and PyTorch otherwise, saying why.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..errors import CnnlabError, InvalidSetting
from ..models.classifier import Classifier
from . import ENGINES

CHECK_IMAGES = 16  # seeded random images the onnxruntime graph must agree with PyTorch on


class TorchEngine:
    """uint8 (N, C, H, W) at the model's size -> probabilities (N, classes), float32 on the CPU."""
    name = "torch"

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier.logits_of_fitted(images), dim=1).cpu()


class OnnxEngine:
    """The same function through onnxruntime, on the graph exported from `classifier` now."""
    name = "onnxruntime"

    def __init__(self, classifier: Classifier, threads: int):
        import onnxruntime as ort

        from .export import PROBABILITY_TOLERANCE, WithPreprocessing, onnx_graph

        card = classifier.card
        module = WithPreprocessing(copy.deepcopy(classifier.model).float().cpu(), card, "nchw").eval()
        images = _check_images(classifier)
        graph = onnx_graph(module, images[:2].clone(), card)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle worker threads sleep instead of spinning: the CPU they would burn is the event loop's
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        expected = TorchEngine(classifier)(images)
        diff = float((self(images) - expected).abs().max())
        if not diff <= PROBABILITY_TOLERANCE:
            raise CnnlabError(f"onnxruntime's probabilities differ from PyTorch's by {diff:.1e} "
                              f"(> {PROBABILITY_TOLERANCE:.0e}) on {len(images)} random images")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self._input: images.contiguous().numpy()})[0])


def _check_images(classifier: Classifier) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = (CHECK_IMAGES, classifier.in_channels, *classifier.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def load_engine(classifier: Classifier, engine: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], str | None]:
    """The engine named (one of ENGINES) for a loaded classifier, and for `auto`, a sentence
    saying why it fell back to PyTorch (None when it did not)."""
    if engine not in ENGINES:
        raise InvalidSetting("engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}.")
    on_cpu = classifier.device.type == "cpu"
    if engine == "torch" or (engine == "auto" and not on_cpu):
        return TorchEngine(classifier), None
    if not on_cpu:
        raise InvalidSetting("engine", f"onnxruntime runs on the CPU here; serve on {classifier.device.type} "
                                       "with --engine torch.")
    threads = torch.get_num_threads()
    if engine == "onnxruntime":
        return OnnxEngine(classifier, threads), None
    try:
        return OnnxEngine(classifier, threads), None
    except ImportError:
        return TorchEngine(classifier), ("onnxruntime is not installed (pip install 'cnnlab[export]' "
                                         "makes a lone request's forward pass 4x faster)")
    except CnnlabError as exc:
        return TorchEngine(classifier), str(exc).rstrip(".")
