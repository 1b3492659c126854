"""The model behind `cnnlab serve`, shared by its APIs (/v1 and the Open Inference Protocol's /v2):
the loaded classifier, the request limits, admission (--max-queue), the micro-batcher and the metrics.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator

import torch
from fastapi import Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..images.spec import TTA_MODES
from ..models.classifier import Classifier
from ..models.registry import count_parameters
from ..rundir import RunDir
from .batching import MicroBatcher
from .engine import load_engine
from .metrics import ServeMetrics
from .uploads import ApiError, Upload, check_upload, decode_upload, describe

# A request whose images hold at most this many pixels in all is decoded in the event loop, without
# the hop to a worker thread and back: for small images the hop costs more than the decoding. With
# the demo model at 16 clients this served 15-20% more requests/s (BENCHMARKS.md, "Serving engine").
# A 128x128 PNG decodes in about 0.25 ms (256x256: 1.7 ms); larger requests go to a worker thread,
# so one large image never stalls the loop.
INLINE_PIXELS = 128 * 128
RETRY_AFTER_SECONDS = 1  # what a refused client is told to wait: the queue drains in well under a second


class ModelInfo(BaseModel):
    name: str = Field(description="name of the run directory")
    architecture: str
    model_args: dict[str, Any]
    parameters: int = Field(description="number of weights")
    num_classes: int
    class_names: list[str]
    in_channels: int
    image_size: list[int] = Field(description="input height and width; images of any size are resized to it")
    mean: list[float] = Field(description="per-channel mean used to normalise inputs (0-1 scale)")
    std: list[float] = Field(description="per-channel standard deviation used to normalise inputs")
    tta: str = Field(description=f"test-time augmentation: one of {', '.join(TTA_MODES)}")
    engine: str = Field(description="what runs the model: onnxruntime or torch")
    dataset: str | None = Field(description="the training dataset")
    test_accuracy: float | None = Field(description="top-1 accuracy on the test split, from summary.json")
    train_seconds: float | None = Field(description="training time, from summary.json")
    weights_sha256: str


class Stats(BaseModel):
    requests: int = Field(description="classification requests answered with predictions (/v1 and /v2)")
    images: int = Field(description="images classified")
    forward_passes: int = Field(description="model forward passes run; fewer than images when batching helps")
    largest_batch: int
    max_batch: int
    max_wait_ms: float
    rejected: int = Field(description="requests refused with 503 because --max-queue requests were in progress")
    max_queue: int


class ModelService:
    """The loaded model and what requests need from it: limits, admission, the micro-batcher, the model card."""

    def __init__(self, run_dir: str | Path, *, max_batch: int, max_wait_ms: float, top_k: int, max_bytes: int,
                 max_pixels: int, max_queue: int, device: str, engine: str = "auto"):
        self.classifier = Classifier.load(run_dir, device)
        self.engine, self.engine_note = load_engine(self.classifier, engine)  # note: why auto fell back to torch
        self.info = model_info(Path(run_dir), self.classifier, self.engine.name)
        self.top_k, self.max_bytes, self.max_pixels, self.max_queue = top_k, max_bytes, max_pixels, max_queue
        self.in_progress = 0  # classification requests admitted and not yet answered
        self.requests = self.rejected = 0
        self.accepting = False  # ready for requests: from start-up until shutdown begins
        self.metrics = ServeMetrics(
            {"name": self.info.name, "architecture": self.info.architecture, "classes": str(self.info.num_classes),
             "tta": self.info.tta, "device": str(self.classifier.device), "engine": self.engine.name,
             "weights_sha256": self.info.weights_sha256},
            queue_depth=lambda: self.batcher.queued, requests_in_progress=lambda: self.in_progress)
        self.batcher = MicroBatcher(self.engine, max_batch, max_wait_ms, on_batch=self.metrics.observe_batch)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of --max-queue places while a request is read, decoded and classified; when all are
        taken, refuse it at once with 503 and Retry-After, before reading its body: under overload the
        server sheds requests instead of queueing them without bound (latency and memory stay bounded)."""
        if self.in_progress >= self.max_queue:
            self.rejected += 1
            self.metrics.rejected.inc()
            raise ApiError(503, f"The server is busy ({self.max_queue} requests in progress); retry in "
                                f"{RETRY_AFTER_SECONDS} s.", {"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

    def prepare(self, uploads: list[Upload]) -> list[torch.Tensor]:
        """Check and decode each upload, fitted to the model's input size."""
        return self._decode(uploads, self._check(uploads))

    async def decode(self, uploads: list[Upload]) -> list[torch.Tensor]:
        """`prepare`, in the event loop for a few small images, in a worker thread otherwise."""
        checked = self._check(uploads)
        if sum(pixels for pixels, _ in checked) <= INLINE_PIXELS:
            return self._decode(uploads, checked)
        return await run_in_threadpool(self._decode, uploads, checked)

    def _check(self, uploads: list[Upload]) -> list[tuple[int, bool]]:
        return [check_upload(upload.data, describe(upload.filename, i), self.max_bytes, self.max_pixels)
                for i, upload in enumerate(uploads, 1)]

    def _decode(self, uploads: list[Upload], checked: list[tuple[int, bool]]) -> list[torch.Tensor]:
        return [self.classifier.fit(decode_upload(upload.data, describe(upload.filename, i), animated))
                for i, (upload, (_, animated)) in enumerate(zip(uploads, checked), 1)]

    async def classify(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class probabilities for uint8 (C, H, W) images at the model's size, from shared forward passes."""
        outputs = await self.batcher.submit(images)
        self.requests += 1
        return outputs

    def stats(self) -> Stats:
        s = self.batcher.stats
        return Stats(requests=self.requests, images=s.images, forward_passes=s.forward_passes,
                     largest_batch=s.largest_batch, max_batch=self.batcher.max_batch,
                     max_wait_ms=self.batcher.max_wait * 1000, rejected=self.rejected, max_queue=self.max_queue)


async def get_service(request: Request) -> ModelService:
    # async: FastAPI runs a plain def dependency in a worker thread, a hop that cost 11% of the
    # event loop's time per request under load (measured with py-spy)
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]  # a route's parameter: the app's loaded model


def model_info(run_dir: Path, classifier: Classifier, engine: str) -> ModelInfo:
    """What /v1/model reports: the model card plus the training results in summary.json."""
    card, summary = classifier.card, RunDir(run_dir).read_summary()
    return ModelInfo(
        **{key: value for key, value in card.to_json().items() if key in ModelInfo.model_fields and key != "dataset"},
        name=run_dir.resolve().name, parameters=count_parameters(classifier.model),
        dataset=summary.get("dataset", card.dataset), test_accuracy=summary.get("test_accuracy"),
        train_seconds=summary.get("train_seconds"), engine=engine)
