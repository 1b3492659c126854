"""Micro-batching: images from concurrent requests share one forward pass.

Requests queue their images; a collector task takes up to `max_batch` of them, waiting at
most `max_wait_ms` after the first for company, and runs the model in a worker thread so
the event loop keeps accepting requests (and filling the next batch) meanwhile. It waits
only while some request is on its way (announced with `coming()`, still being read or
decoded): a lone request runs at once instead of waiting for company that is not coming.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

Item = tuple[torch.Tensor, "asyncio.Future[torch.Tensor]"]


@dataclass
class BatchStats:
    forward_passes: int = 0
    images: int = 0
    largest_batch: int = 0


class MicroBatcher:
    """Run `forward` (uint8 (N, C, H, W) -> (N, ...) outputs) on batches gathered from `submit` calls."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000  # seconds
        self.stats = BatchStats()
        self.on_batch = on_batch  # called with each forward pass's image count (metrics)
        self.on_the_way = 0  # requests announced with coming() that have not submitted yet
        self._queue: asyncio.Queue[Item] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start collecting; call from the event loop that will call `submit`."""
        self._queue = asyncio.Queue()
        # one thread: forward passes run one after another, each using torch's own intra-op threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-model")
        self._collector = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._queue = self._collector = self._executor = None

    @property
    def queued(self) -> int:
        """Images waiting for a forward pass."""
        return self._queue.qsize() if self._queue is not None else 0

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Announce a request that will submit images once it has read and decoded them: while
        any is on its way, a batch being gathered waits for it (up to max_wait_ms)."""
        self.on_the_way += 1
        try:
            yield
        finally:
            self.on_the_way -= 1

    async def submit(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The model's outputs for uint8 (C, H, W) images, once the batches they joined have run.

        The images are queued together, so one request's images share a batch where they fit.
        All images submitted must have the same shape (the model's input size)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[torch.Tensor]] = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self._queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._run(batch)

    async def _next_batch(self) -> list[Item]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if self._queue.empty() and self.on_the_way == 0:
                break  # nobody else is coming: waiting for company would only add latency
            remaining = deadline - loop.time()
            try:
                # after the deadline, still take what is already waiting: it queued during the last pass
                item = self._queue.get_nowait() if remaining <= 0 else \
                    await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            batch.append(item)
        return batch

    async def _run(self, batch: list[Item]) -> None:
        batch = [(image, future) for image, future in batch if not future.done()]  # skip cancelled requests
        if not batch:
            return
        images = torch.stack([image for image, _ in batch])
        try:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, self.forward, images)
        except Exception as exc:  # the requests report it; the collector carries on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.stats.forward_passes += 1
        self.stats.images += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for (_, future), output in zip(batch, outputs):
            if not future.done():
                future.set_result(output)
