"""What data-parallel training sends per step, and what that costs on this machine: the bytes of
gradients DDP all-reduces per optimiser step for each recipe's network, the measured time of that
all-reduce between 2 processes over gloo on loopback, one process's measured compute per step,
and a projection (not a measurement) of the step time on N nodes: compute / N + all-reduce.
Also the cost of the stop-signal check every step takes (one all-reduce of two numbers).

    python -m benchmarks allreduce [--recipes fast,cifar] [--steps 30]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size: one all-reduce per bucket


def _network(recipe: str) -> tuple[torch.nn.Module, int, tuple[int, int, int]]:
    """The recipe's network for its usual data (Fashion-MNIST for fast, CIFAR-10 otherwise), its batch, input shape."""
    from cnnlab.models.registry import create_model
    from cnnlab.training.config import make_config

    config = make_config(recipe=recipe)
    shape = (1, 28, 28) if recipe == "fast" else (3, 32, 32)
    model = create_model(config.model, shape[0], 10, **config.model_args)
    return model, config.batch_size or 256, shape


def _worker(rank: int, port: int, numel: int, steps: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grads = torch.randn(numel)
    buckets = list(grads.split(BUCKET_BYTES // 4))
    times = []
    for i in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        for bucket in buckets:
            dist.all_reduce(bucket)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    flag, checks = torch.zeros(2, dtype=torch.float64), []  # the per-step stop-signal check (preempt.py)
    for i in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if i >= 3:
            checks.append(time.perf_counter() - start)
    if rank == 0:
        out.put((statistics.median(times), statistics.median(checks)))
    dist.destroy_process_group()


def _allreduce_seconds(numel: int, steps: int) -> tuple[float, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(port, numel, steps, queue), nprocs=2, join=True)
    return queue.get()


def _compute_seconds(model: torch.nn.Module, batch: int, shape: tuple[int, int, int], steps: int) -> float:
    """One process's forward, backward and SGD step on random data at the recipe's batch (fp32)."""
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(recipes: list[str], steps: int) -> list[dict[str, Any]]:
    results = []
    for recipe in recipes:
        model, batch, shape = _network(recipe)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        allreduce, stop_check = _allreduce_seconds(numel, steps)
        compute = _compute_seconds(model, batch, shape, steps)
        result = {"recipe": recipe, "parameters": numel, "bytes_per_step": numel * 4,
                  "allreduce_ms_2_processes_loopback": round(allreduce * 1000, 2),
                  "stop_check_ms": round(stop_check * 1000, 3),
                  "compute_ms_per_step_1_process": round(compute * 1000, 1), "batch": batch,
                  "projected_step_ms": {n: round((compute / n + (allreduce if n > 1 else 0)) * 1000, 1)
                                        for n in (1, 2, 4, 8)}}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results
