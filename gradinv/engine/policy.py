"""Device policy: how the seeds of one inversion step are computed on this machine. Every choice
here changes speed or memory only (`engine` in params.yaml); `auto` values pick by measurement
(docs/performance.md)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from gradinv.client.models import resolve_device
from gradinv.engine.batchnorm import with_explicit_double_backward
from gradinv.engine.cpu_allocator import keep_freed_memory
from gradinv.engine.experimental.convolution import with_explicit_conv_double_backward
from gradinv.engine.relu import with_detached_relu_masks
from gradinv.pipeline.config import EngineConfig

SeedRunner = Callable[[Callable[[int], dict], range], list[dict]]

# Auto seed batching on CUDA stacks seeds up to this many images per call: on an H200, ResNet-50
# at 224 px, bs 8 × 8 seeds ran faster batched, while at bs 48 batching gained nothing over one
# seed at a time (docs/performance.md).
BATCHED_IMAGES = 64


@dataclass(frozen=True)
class StepPlan:
    device: torch.device
    seeds_per_call: int     # seeds through the model in one vmapped call (1: one by one)
    workers: int            # threads stepping seeds at once, when seeds go one by one
    graphed: bool           # the step captured once as a CUDA graph and replayed
    shrink_if_out_of_memory: bool  # seeds_per_call was chosen by auto and may be halved


def plan_step(engine: EngineConfig, seeds: int, batch_size: int, fedavg: bool) -> StepPlan:
    """A FedAvg update's replay can be neither batched over seeds nor graphed; elsewhere:
    - seed_batch auto: on CUDA as many seeds as keep a call within BATCHED_IMAGES images, since one
      seed's step alone leaves the GPU waiting on kernel launches; on a CPU one by one, on threads;
    - cuda_graph auto: graphed wherever CUDA is;
    - seed_workers auto: on a CPU one thread per seed up to torch's thread budget (each thread
      running torch on one thread beat one seed at a time on all threads); on CUDA one."""
    device = resolve_device(engine.device)
    if engine.seed_batch:
        per_call = min(engine.seed_batch, seeds)
    elif device.type != "cuda" or fedavg:
        per_call = 1
    else:
        per_call = max(1, min(seeds, BATCHED_IMAGES // batch_size))
    graphed = device.type == "cuda" and not fedavg and engine.cuda_graph is not False
    if engine.seed_workers:
        workers = min(engine.seed_workers, seeds)
    else:
        workers = max(1, min(seeds, torch.get_num_threads())) if device.type == "cpu" else 1
    if per_call > 1 or graphed:
        workers = 1
    return StepPlan(device, per_call, workers, graphed, shrink_if_out_of_memory=engine.seed_batch == 0)


def explicit_bn_double_backward(engine: EngineConfig, device: torch.device, seeds: int) -> bool:
    """`bn_double_backward: auto`: explicit on CUDA with more than one seed, where the graphed step
    ran faster with it on an H100; PyTorch's with one seed and on a CPU, where explicit was no
    faster. Under half precision always explicit: PyTorch's BatchNorm under vmap fails under
    autocast. `explicit-fused` is explicit as well."""
    if engine.bn_double_backward != "auto":
        return engine.bn_double_backward.startswith("explicit")
    return engine.precision != "float32" or (device.type == "cuda" and seeds > 1)


def attacker_model(model: nn.Module, engine: EngineConfig, device: torch.device, seeds: int) -> nn.Module:
    """`model` (the attacker's own train-mode copy) on `device`, with layers of the engine's that
    compute the same function and move less data in its second derivative swapped in place."""
    model = with_detached_relu_masks(model.to(device))
    if explicit_bn_double_backward(engine, device, seeds):
        model = with_explicit_double_backward(model, fused=engine.bn_double_backward == "explicit-fused")
    if engine.conv_double_backward != "pytorch":
        model = with_explicit_conv_double_backward(model, engine.conv_double_backward)
    return model


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 tensor cores for convolutions and matrix products (CUDA only) while active; torch's
    own settings come back afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextmanager
def seed_runner(workers: int) -> Iterator[SeedRunner]:
    """map(fn, seeds) in a loop, or over `workers` threads that each run torch on one thread
    (torch's intra-op thread count is per calling thread); results come back in seed order."""
    if workers == 1:
        yield lambda fn, items: [fn(i) for i in items]
        return
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield lambda fn, items: list(pool.map(fn, items))


@contextmanager
def running(engine: EngineConfig, plan: StepPlan) -> Iterator[SeedRunner]:
    """The machine set up for the inversion loop (allocator, TF32); yields the seed runner."""
    if plan.device.type == "cpu" and engine.keep_freed_memory:
        keep_freed_memory()
    with tf32_matmuls(engine.tf32), seed_runner(plan.workers) as run_seeds:
        yield run_seeds
