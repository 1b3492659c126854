"""The micro-batcher on its own: who waits for whom, and what shares a forward pass."""

from __future__ import annotations

import asyncio

import torch

from cnnlab.deploy.batching import MicroBatcher


def double(images: torch.Tensor) -> torch.Tensor:
    return images.float() * 2


def image(value: int) -> torch.Tensor:
    return torch.full((1, 4, 4), value, dtype=torch.uint8)


def run(scenario) -> MicroBatcher:
    async def main() -> MicroBatcher:
        batcher = MicroBatcher(double, max_batch=8, max_wait_ms=10_000)  # a wait long enough to notice
        await batcher.start()
        try:
            await asyncio.wait_for(scenario(batcher), timeout=5)  # a batch that waited 10 s fails here
        finally:
            await batcher.stop()
        return batcher
    return asyncio.run(main())


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def scenario(batcher: MicroBatcher) -> None:
        out = await batcher.submit([image(3)])
        assert torch.equal(out[0], torch.full((1, 4, 4), 6.0))
    assert run(scenario).stats.forward_passes == 1


def test_one_requests_images_share_a_forward_pass() -> None:
    async def scenario(batcher: MicroBatcher) -> None:
        outs = await batcher.submit([image(i) for i in range(5)])
        assert [int(o[0, 0, 0]) for o in outs] == [0, 2, 4, 6, 8]
    stats = run(scenario).stats
    assert (stats.forward_passes, stats.images, stats.largest_batch) == (1, 5, 5)


def test_a_batch_waits_for_a_request_on_its_way() -> None:
    async def late(batcher: MicroBatcher) -> list[torch.Tensor]:
        with batcher.coming():
            await asyncio.sleep(0.3)  # still reading and decoding its upload
        return await batcher.submit([image(2)])

    async def scenario(batcher: MicroBatcher) -> None:
        second = asyncio.create_task(late(batcher))
        await asyncio.sleep(0)  # the second request has announced itself
        first = await batcher.submit([image(1)])
        assert int(first[0][0, 0, 0]) == 2 and int((await second)[0][0, 0, 0]) == 4
    stats = run(scenario).stats
    assert (stats.forward_passes, stats.largest_batch) == (1, 2)
