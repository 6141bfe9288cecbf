"""Stage `invert` (attacker side): GradInversion. G seeds of images start as N(0, 1) noise in
normalised space and descend the gradient-matching objective under image priors:

    α_G Σ_l ‖∇_{W_l} L(x̂, ŷ) − ΔW_l‖₂ + α_tv TV(x̂) + α_l2 ‖x̂‖₂ + α_BN Σ_l (‖μ_l − μ*_l‖₂ + ‖σ²_l − σ²*_l‖₂)

through the client's own train-mode forward (see gradinv.client)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gradinv.artifacts import GradientArtifact, load_gradient
from gradinv.client import parameter_gradients, recorded_bn_statistics, train_mode_copy
from gradinv.config import InversionConfig, as_dict
from gradinv.data import denormalize
from gradinv.errors import UserError
from gradinv.io import read_json, write_json, write_table, write_tensors
from gradinv.models import batchnorm_layers, resolve_device
from gradinv.progress import progress
from gradinv.victim import load_victim

LOSS_TERMS = ("total", "grad", "tv", "l2", "bn")
RECONSTRUCTION_FILE = "reconstruction.safetensors"
LogCallback = Callable[[int, dict[str, float]], None]


@dataclass
class InversionResult:
    images: torch.Tensor          # (G, B, 3, H, W), normalised space
    initial: torch.Tensor         # (G, B, 3, H, W), the starting noise
    final_grad_loss: list[float]  # per seed: unweighted gradient distance at the end
    chosen_seed: int              # the seed with the lowest final gradient distance
    log: list[dict]               # rows: iteration, seed, lr and each loss term
    seconds: float


def learning_rate(step: int, config: InversionConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.iterations - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / span))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x[..., 1:, :] - x[..., :-1, :]) + torch.linalg.vector_norm(x[..., :, 1:] - x[..., :, :-1])


class Objective:
    """The GradInversion objective for one batch, against one gradient artifact."""

    def __init__(self, model: nn.Module, artifact: GradientArtifact, labels: torch.Tensor, config: InversionConfig):
        self.model = model
        self.labels = labels
        self.config = config
        device = labels.device
        self.target = {n: g.to(device) for n, g in artifact.grads.items()}
        self.bn_targets = self._bn_targets(model, artifact, config.bn_prior, device)

    @staticmethod
    def _bn_targets(model, artifact, prior: str, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if prior == "none" or not artifact:
            return {}
        layers = batchnorm_layers(model)
        if not layers:
            raise UserError(f"the BN prior (inversion.bn_prior: {prior}) needs BatchNorm layers, and the model has none.")
        if prior == "exact":
            if not artifact.has_bn_statistics:
                raise UserError("inversion.bn_prior 'exact' needs the batch's BN statistics, but the gradient artifact has none (use 'approx').")
            return {n: (artifact.bn_mean[n].to(device), artifact.bn_var[n].to(device)) for n in layers}
        return {n: (bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for n, bn in layers.items()}

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with recorded_bn_statistics(self.model) as stats:
            grads = parameter_gradients(self.model, x, self.labels, create_graph=True)
        grad = sum(torch.linalg.vector_norm(grads[n] - t) for n, t in self.target.items())
        bn = x.new_zeros(())
        for index, (name, (mean, var)) in enumerate(self.bn_targets.items()):
            weight = self.config.first_bn_multiplier if index == 0 else 1.0
            batch_mean, batch_var = stats[name]
            bn = bn + weight * (torch.linalg.vector_norm(batch_mean - mean) + torch.linalg.vector_norm(batch_var - var))
        terms = {"grad": grad, "tv": total_variation(x), "l2": torch.linalg.vector_norm(x), "bn": bn}
        c = self.config
        terms["total"] = c.alpha_grad * grad + c.alpha_tv * terms["tv"] + c.alpha_l2 * terms["l2"] + c.alpha_bn * bn
        return terms


def pixel_box(mean: list[float], std: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of valid pixels [0, 1] in normalised space, shaped (1, 3, 1, 1)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (0 - m) / s, (1 - m) / s


def invert(model: nn.Module, artifact: GradientArtifact, labels: list[int], config: InversionConfig,
           on_log: LogCallback | None = None) -> InversionResult:
    """Reconstruct the batch behind `artifact`. Reads only the model, the artifact and the labels."""
    if len(labels) != artifact.batch_size:
        raise UserError(f"{len(labels)} labels were given for a gradient of batch size {artifact.batch_size}.")
    device = resolve_device(config.device)
    attacker = train_mode_copy(model).to(device)
    y = torch.tensor(labels, dtype=torch.int64, device=device)
    objective = Objective(attacker, artifact, y, config)
    shape = (artifact.batch_size, *artifact.meta["input_shape"])
    low, high = pixel_box(artifact.meta["mean"], artifact.meta["std"], device)

    seeds = []
    for g in range(config.seeds):
        generator = torch.Generator().manual_seed(config.seed * 1000 + g)
        seeds.append(torch.randn(shape, generator=generator).to(device).requires_grad_(True))
    initial = torch.stack([x.detach().clone() for x in seeds]).cpu()
    optimizers = [torch.optim.Adam([x], lr=config.lr) for x in seeds]

    log: list[dict] = []
    start = time.perf_counter()
    for step in progress(range(config.iterations), "invert", unit="it"):
        lr = learning_rate(step, config)
        for g, (x, optimizer) in enumerate(zip(seeds, optimizers)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = objective.terms(x)
            (x.grad,) = torch.autograd.grad(terms["total"], x)
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if step % config.log_every == 0 or step == config.iterations - 1:
                row = {"iteration": step, "seed": g, "lr": lr, **{k: float(terms[k].detach()) for k in LOSS_TERMS}}
                log.append(row)
                if on_log is not None:
                    on_log(step, {f"seed{g}_{k}": row[k] for k in LOSS_TERMS})
    seconds = time.perf_counter() - start

    final = [float(objective.terms(x)["grad"].detach()) for x in seeds]
    images = torch.stack([x.detach() for x in seeds]).cpu()
    return InversionResult(images, initial, final, int(torch.tensor(final).argmin()), log, seconds)


def read_labels(labels_dir: str | Path, num_classes: int) -> list[int]:
    info = read_json(Path(labels_dir) / "labels.json", "recovered labels")
    labels = info.get("labels")
    if not isinstance(labels, list) or not all(isinstance(v, int) and 0 <= v < num_classes for v in labels):
        raise UserError(f"recovered labels in {labels_dir} must be a list of class indices below {num_classes}.")
    return labels


def run_inversion(config: InversionConfig, victim_dir: str | Path, gradient_dir: str | Path,
                  labels_dir: str | Path, out_dir: str | Path, on_log: LogCallback | None = None) -> list[Path]:
    """Stage `invert`: reconstruction.safetensors (pixel space), invert.json, loss.parquet."""
    model, victim = load_victim(victim_dir)
    artifact = load_gradient(gradient_dir, model, expected={"arch": victim.arch, "num_classes": victim.num_classes,
                                                            "input_shape": victim.input_shape})
    labels = read_labels(labels_dir, victim.num_classes)
    result = invert(model, artifact, labels, config, on_log)
    mean, std = artifact.meta["mean"], artifact.meta["std"]
    to_pixels = lambda t: denormalize(t.flatten(0, 1), mean, std).clamp(0, 1).view_as(t)  # noqa: E731
    out_dir = Path(out_dir)
    images = to_pixels(result.images)
    columns = {k: [row[k] for row in result.log] for k in ("iteration", "seed", "lr", *LOSS_TERMS)}
    summary = {"labels": labels, "chosen_seed": result.chosen_seed, "final_grad_loss": result.final_grad_loss,
               "seconds": result.seconds, "seconds_per_iteration": result.seconds / config.iterations,
               "params": as_dict(config)}
    return [
        # Every seed gives slot i the same label, so the slots already correspond across seeds
        # and their plain pixel mean is the (unregistered, "lazy") consensus.
        write_tensors(out_dir / RECONSTRUCTION_FILE, {"seeds": images, "chosen": images[result.chosen_seed],
                                                      "consensus": images.mean(0),
                                                      "initial": to_pixels(result.initial),
                                                      "labels": torch.tensor(labels)}),
        write_table(out_dir / "loss.parquet", columns),
        write_json(out_dir / "invert.json", summary),
    ]
