"""One inversion iteration of all G seeds, as `invert` runs it: each seed's image gradient of the
objective (under autocast where `engine.precision` asks for a half type), seed by seed (on
threads on a CPU) or chunks of seeds at once (torch.func.vmap); then one Adam update of the
stacked seeds (elementwise, so the same as an Adam per seed), the Langevin noise and the pixel
box. The iteration's inputs (learning rate, each seed's view, the noise, the
consensus) live in tensors of fixed place that `fill` rewrites, so that the same step can be
captured once as a CUDA graph and replayed (gradinv.engine.cuda_graph). A step that runs out of GPU
memory with seeds batched by `seed_batch: auto` is taken again with half as many seeds per
chunk (the same objective: seed_batch only sets the speed); otherwise it stops with one
sentence."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.attack.views import View, apply_views, view_indices, views_enabled
from gradinv.engine.cuda_graph import GraphedStep
from gradinv.engine.policy import SeedRunner, StepPlan
from gradinv.errors import UserError
from gradinv.pipeline.config import EngineConfig, InversionConfig


class SeedStep:
    def __init__(self, objectives: list[Objective], images: torch.Tensor, config: InversionConfig,
                 engine: EngineConfig, box: tuple[torch.Tensor, torch.Tensor], plan: StepPlan):
        """`images` (G, B, 3, H, W) on the device, the seeds' starting point; `objectives` one per
        seed (threads need a model each) or the same one G times; chunks of `plan.seeds_per_call`
        seeds run batched (1 and not graphed: seed by seed), halved while the GPU runs out of
        memory if the plan allows it (the chunks were chosen by seed_batch: auto)."""
        self.objectives, self.config, self.engine, self.box = objectives, config, engine, box
        self.fewer_seeds_if_out_of_memory = plan.shrink_if_out_of_memory
        graphed, batch = plan.graphed, plan.seeds_per_call
        self.graphed, self.device = graphed, images.device
        self.images = images.requires_grad_(True)
        self.images.grad = torch.zeros_like(images)  # rewritten in place by every step (a graph keeps its address)
        # Under a CUDA graph the learning rate is a tensor, whose value each replay reads.
        lr = torch.tensor(config.lr, device=self.device) if graphed else config.lr
        self.optimizer = torch.optim.Adam([self.images], lr=lr, capturable=graphed)
        # The noise's own generator, on the device (no host-side draws and copies per iteration),
        # seeded apart from the seeds' generators (config.seed * 1000 + g).
        self.noise_generator = torch.Generator(self.device).manual_seed(config.seed * 1000 + 999_999)
        seeds, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        self.batched = batch > 1 or graphed
        self._chunk_seeds(batch)
        self.rows, self.cols = (t.to(self.device) for t in view_indices([(0, 0, False)] * seeds, height, width))
        self.noise = torch.zeros_like(images) if config.langevin else None
        self.consensus = torch.zeros(images.shape[1:], device=self.device)

    def restore(self, images: torch.Tensor, optimizer: dict, noise_generator: torch.Tensor) -> None:
        with torch.no_grad():
            self.images.copy_(images)
        self.optimizer.load_state_dict(optimizer)
        self.noise_generator.set_state(noise_generator)

    def set_consensus(self, consensus: torch.Tensor) -> None:
        self.consensus.copy_(consensus)  # copied into place, as `fill` does

    def fill(self, lr: float, views: list[View]) -> None:
        """This iteration's inputs, copied into place (never rebound: a captured step reads them
        where they were)."""
        group = self.optimizer.param_groups[0]
        if self.graphed:
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        if views_enabled(self.config):
            pinned = self.device.type == "cuda"
            for buffer, values in zip((self.rows, self.cols), view_indices(views, *self.images.shape[-2:])):
                buffer.copy_(values.pin_memory() if pinned else values, non_blocking=True)
        if self.noise is not None:
            self.noise.normal_(generator=self.noise_generator)

    def runner(self, run_seeds: SeedRunner) -> Callable[[bool], dict[str, torch.Tensor]]:
        """The step as a function of whether the consensus term is on: eager, or graphed."""
        step = lambda with_consensus: self.step(with_consensus, run_seeds)  # noqa: E731
        if not self.graphed:
            return step
        return GraphedStep(step, self.device, eager_if_uncapturable=self.engine.cuda_graph == "auto")

    def _chunk_seeds(self, per_chunk: int) -> None:
        seeds = self.images.shape[0]
        self.seeds_per_chunk = per_chunk if self.batched else 1
        self.chunks = [slice(first, min(first + per_chunk, seeds)) for first in range(0, seeds, per_chunk)]

    def step(self, with_consensus: bool, run_seeds: SeedRunner) -> dict[str, torch.Tensor]:
        """Every seed's gradient and update from the filled inputs; the loss terms, each (G,)."""
        pull = self.consensus if with_consensus else None
        while (terms := self._gradients(pull, run_seeds)) is None:
            fewer = (self.seeds_per_chunk + 1) // 2
            print(f"gradinv: warning: out of GPU memory with {self.seeds_per_chunk} seeds per batched call; "
                  f"{fewer} from now on (engine.seed_batch: auto).", file=sys.stderr)
            self._chunk_seeds(fewer)
            torch.cuda.empty_cache()
        self.optimizer.step()
        low, high = self.box
        with torch.no_grad():
            if self.noise is not None:
                self.images.add_(self.noise * (self.optimizer.param_groups[0]["lr"] * self.config.langevin))
            self.images.copy_(torch.maximum(torch.minimum(self.images, high), low))
        return terms

    def _gradients(self, consensus: torch.Tensor | None, run_seeds: SeedRunner) -> dict[str, torch.Tensor] | None:
        """Every seed's image gradient into images.grad; the loss terms. None where the GPU ran out
        of memory and the chunks may shrink: the caller halves them once this attempt's tensors are
        freed (they live until the exception is left behind), and takes the step again."""
        try:
            if self.batched:
                parts = [self._chunk_gradient(chunk, consensus) for chunk in self.chunks]
                return {k: torch.cat([part[k] for part in parts]) for k in LOSS_TERMS}
            parts = run_seeds(lambda g: self._seed_gradient(g, consensus), range(self.images.shape[0]))
            return {k: torch.stack([part[k] for part in parts]) for k in LOSS_TERMS}
        except torch.cuda.OutOfMemoryError as err:
            capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if self.fewer_seeds_if_out_of_memory and self.seeds_per_chunk > 1 and not capturing:
                return None
            raise UserError(self._out_of_memory(capturing)) from err

    def _out_of_memory(self, capturing: bool) -> str:
        batch, height, width = self.images.shape[1], self.images.shape[-2], self.images.shape[-1]
        images = f"{batch} images of {height}x{width} px per seed"
        if capturing:
            return (f"out of GPU memory while capturing the step as a CUDA graph ({self.seeds_per_chunk} seeds per "
                    "batched call): set engine.cuda_graph: false, or engine.seed_batch lower.")
        if self.seeds_per_chunk > 1:
            return (f"out of GPU memory with {self.seeds_per_chunk} seeds per batched call ({images}): "
                    "set engine.seed_batch lower, or to 0 (auto), which lowers it by itself.")
        return (f"out of GPU memory with one seed at a time ({images}): this batch needs a GPU with more "
                "memory (benchmarks/step_memory.py estimates the step's peak).")

    def _seed_gradient(self, g: int, consensus: torch.Tensor | None) -> dict[str, torch.Tensor]:
        x = self.images[g].detach().requires_grad_(True)
        rows, cols = self.rows[g:g + 1], self.cols[g:g + 1]
        view = (lambda t: apply_views(t[None], rows, cols)[0]) if views_enabled(self.config) else None
        with self._precision():
            terms = self.objectives[g].terms(x, consensus, view)
        (grad,) = torch.autograd.grad(terms["total"], x)
        self.images.grad[g].copy_(grad)
        return {k: v.detach().float() for k, v in terms.items()}

    def _chunk_gradient(self, chunk: slice, consensus: torch.Tensor | None) -> dict[str, torch.Tensor]:
        xs = self.images[chunk].detach().requires_grad_(True)
        seen = apply_views(xs, self.rows[chunk], self.cols[chunk]) if views_enabled(self.config) else xs
        with self._precision():
            terms = self.objectives[0].batched_terms(xs, seen, consensus)
        (grad,) = torch.autograd.grad(terms["total"].sum(), xs)
        self.images.grad[chunk].copy_(grad)
        return {k: v.detach().float() for k, v in terms.items()}

    def _precision(self) -> AbstractContextManager:
        """`engine.precision`: the objective (forward and parameter gradients; the image gradient
        follows in the precisions they ran in) under autocast to a half type, or as it is. Entered
        in the thread that computes (autocast is per thread); no cast cache, which a CUDA graph's
        capture cannot keep."""
        if self.engine.precision == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.engine.precision), cache_enabled=False)
