"""`OnnxClassifier`: classify images with an exported model.onnx through onnxruntime alone.

It needs only onnxruntime, numpy and Pillow, never PyTorch: the model card travels in the model's
metadata, and decoding, fitting, normalisation and test-time augmentation are images.arrays', the
numpy twin of what the torch classifier does. A self-contained export (`--with-preprocessing`:
uint8 in, probabilities out) does its normalisation and test-time augmentation in the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from ..card import ModelCard, Prediction
from ..errors import CnnlabError
from ..images.arrays import as_uint8, drop_alpha, fit, pil_to_array, read_image, softmax, tta_logits
from ..rundir import RunDir

PREDICT_BATCH = 256  # images per forward pass in predict

ImageLike = Union[str, Path, Image.Image, np.ndarray]


# ---------------------------------------------------------------- the classifier

class OnnxClassifier:
    """An exported model plus its preprocessing, run by onnxruntime; the same interface as Classifier."""

    def __init__(self, session: ort.InferenceSession, card: ModelCard):
        self.session = session
        self.card = card
        self.class_names: list[str] = list(card.class_names)
        self.in_channels: int = card.in_channels
        self.image_size: tuple[int, int] = card.image_size
        self.tta: str = card.tta  # may be changed after loading
        # the same float32 arithmetic as cnnlab.data.Normalize, so inputs agree bit for bit
        mean, std = np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32)
        self._scale = (np.float32(1) / (np.float32(255) * std)).reshape(1, -1, 1, 1)
        self._shift = (mean / std).reshape(1, -1, 1, 1)
        graph_input = session.get_inputs()[0]
        self._input = graph_input.name
        # a self-contained graph takes uint8 images, (N, H, W, C) or (N, C, H, W), and answers probabilities
        self.self_contained = graph_input.type == "tensor(uint8)"
        self._nhwc = self.self_contained and list(graph_input.shape[1:]) == [*card.image_size, card.in_channels]

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
             threads: int | None = None) -> "OnnxClassifier":
        """Open an exported .onnx file, or the model.onnx of a run directory."""
        path = Path(path)
        if path.is_dir():
            if not (path / RunDir.ONNX).is_file():
                raise CnnlabError(f"{path} holds no {RunDir.ONNX}; run `cnnlab export {path} --format onnx` first.")
            path = path / RunDir.ONNX
        elif not path.is_file():
            raise CnnlabError(f"{path} does not exist.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own types for malformed files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CnnlabError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {first}).") from None
        card = ModelCard.from_properties(session.get_modelmeta().custom_metadata_map, str(path))
        # in a run directory, the file must come from the run's current weights, not a run trained over it
        RunDir(path.parent).check_derived(path, card.weights_sha256, f"cnnlab export {path.parent}")
        return cls(session, card)

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) of any size and channel count -> the normalised float32 input of the model
        (of a self-contained graph: the uint8 images at the model's size, in its layout)."""
        batch = fit(_check_batch(batch), self.in_channels, self.image_size)
        if self.self_contained:
            return np.ascontiguousarray(batch.transpose(0, 2, 3, 1) if self._nhwc else batch)
        return batch.astype(np.float32) * self._scale - self._shift

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits of the plain network for a normalised float32 batch (N, C, H, W)."""
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a uint8 batch (N, C, H, W), with the test-time augmentation the model records
        (of a self-contained graph: log-probabilities, which softmax maps back to its probabilities)."""
        if self.self_contained:
            if self.tta != self.card.tta:
                raise CnnlabError(f"This model.onnx has its test-time augmentation ({self.card.tta}) built in; "
                                  f"for {self.tta}, export the plain graph (cnnlab export without "
                                  "--with-preprocessing).")
            probabilities = self.session.run(None, {self._input: self.prepare(batch)})[0]
            return np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))
        return tta_logits(self.forward, self.prepare(batch), self.tta, self.card.tta_flip)

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k (label, probability) for each image: paths, PIL images, or arrays (H, W) / (H, W, C)."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise CnnlabError("No images were given to predict.")
        k = max(1, min(top_k, len(self.class_names)))
        results = []
        for start in range(0, len(images), PREDICT_BATCH):  # decoded a batch at a time, to bound memory
            batch = np.stack([fit(self._one(image)[None], self.in_channels, self.image_size)[0]
                              for image in images[start:start + PREDICT_BATCH]])
            probs = softmax(self.logits(batch))
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            results += [[Prediction(self.class_names[i], float(p[i]), int(i)) for i in idx]
                        for p, idx in zip(probs, top)]
        return results

    def _one(self, image: ImageLike) -> np.ndarray:
        """One image as uint8 (C, H, W)."""
        if isinstance(image, (str, Path)):
            return read_image(image).transpose(2, 0, 1)
        if isinstance(image, Image.Image):
            return drop_alpha(pil_to_array(image)).transpose(2, 0, 1)
        if isinstance(image, np.ndarray):
            array = as_uint8(image)
            if array.ndim == 2:
                array = array[..., None]
            if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
                raise CnnlabError(f"An image array must be (H, W) or (H, W, C) with C in 1-4, got {image.shape}.")
            return drop_alpha(array).transpose(2, 0, 1)
        raise CnnlabError(f"Cannot classify an object of type {type(image).__name__}; "
                          "pass a path, PIL image or numpy array.")


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.dtype != np.uint8:
        shape = getattr(batch, "shape", None)
        raise CnnlabError(f"Expected a uint8 numpy batch (N, C, H, W), got {type(batch).__name__} {shape}.")
    return batch
