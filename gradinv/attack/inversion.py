"""Stage `invert` (attacker side): GradInversion. G seeds of images start as N(0, 1) noise in
normalised space and descend the objective (gradinv.attack.objective) with Adam, a warm-up then cosine
learning rate, optional Langevin noise, random jitter and flips, and the group-consistency pull
towards the seeds' consensus; images stay in the valid pixel box. Long runs checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gradinv.attack.checkpoint import InversionState, load_checkpoint, save_checkpoint
from gradinv.attack.consensus import consensus as fuse
from gradinv.attack.objective import LOSS_TERMS, TERM_WEIGHTS, Objective, balanced_alpha_grad, loss_metrics, with_shares
from gradinv.attack.outputs import RECONSTRUCTION_FILE
from gradinv.attack.views import draw_view
from gradinv.client.artifacts import TENSOR_FILE, GradientArtifact, load_gradient
from gradinv.client.data import denormalize
from gradinv.client.step import train_mode_copy
from gradinv.client.victim import load_victim
from gradinv.commit import commits
from gradinv.engine import SeedStep, attacker_model, plan_step, running
from gradinv.errors import UserError
from gradinv.io import read_json, write_json, write_table, write_tensors
from gradinv.pipeline.config import EngineConfig, InversionConfig, as_dict, result_changing
from gradinv.progress import progress

LogCallback = Callable[[int, dict[str, float]], None]


@dataclass
class InversionResult:
    images: torch.Tensor          # (G, B, 3, H, W), normalised space
    initial: torch.Tensor         # (G, B, 3, H, W), the starting noise
    final_grad_loss: list[float]  # per seed: gradient distance at the end
    final_objective: list[float]  # per seed: the objective at the end, without the group pull
    zero_gradient_distance: float  # an all-zero gradient's distance: the target's size in that distance
    lowest_gradient_seed: int     # the seed with the lowest final gradient distance
    log: list[dict]               # rows: iteration, seed, lr and each loss term
    seconds: float
    alpha_grad: float             # the gradient term's weight used: as set, or from inversion.grad_share


def learning_rate(step: int, config: InversionConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.iterations - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / span))


def pixel_box(mean: list[float], std: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of valid pixels [0, 1] in normalised space, shaped (1, 3, 1, 1)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (0 - m) / s, (1 - m) / s


def _group_refresh_due(step: int, config: InversionConfig) -> bool:
    return config.alpha_group > 0 and step >= config.group_start and (step - config.group_start) % config.group_refresh == 0


def _non_finite_cause(engine: EngineConfig) -> str:
    return (f" under engine.precision {engine.precision}, whose range or rounding it exceeded; use float32"
            if engine.precision != "float32" else "; lower inversion.lr, or check the gradient file")


def refuse_non_finite(values: dict[str, list[float]], step: int, engine: EngineConfig) -> None:
    """One sentence, where a logged loss term is no longer a finite number: the images would go on
    from a meaningless gradient."""
    bad = [(g, k) for k in LOSS_TERMS for g, value in enumerate(values[k]) if not math.isfinite(value)]
    if not bad:
        return
    g, k = bad[0]
    raise UserError(f"the objective became non-finite at iteration {step} (seed {g}, term '{k}'){_non_finite_cause(engine)}.")


def refuse_non_finite_images(images: torch.Tensor, done: int, engine: EngineConfig) -> None:
    """One sentence, where an image went non-finite between logged iterations, before its state
    could overwrite the last good checkpoint (a resumed run would start from it and fail again)."""
    finite = torch.isfinite(images.detach().flatten(1)).all(1).tolist()
    if all(finite):
        return
    raise UserError(f"the images became non-finite before iteration {done} (seed {finite.index(False)})"
                    f"{_non_finite_cause(engine)}; the last checkpoint was kept.")


def attacker_objective(model: nn.Module, artifact: GradientArtifact, labels: torch.Tensor, config: InversionConfig,
                       engine: EngineConfig, device: torch.device) -> Objective:
    """The objective on the attacker's own train-mode copy of `model`, on `device`, with the
    engine's layers swapped in (gradinv.engine.attacker_model)."""
    return Objective(attacker_model(train_mode_copy(model), engine, device, config.seeds), artifact, labels, config)


def invert(model: nn.Module, artifact: GradientArtifact, labels: list[int], config: InversionConfig,
           on_log: LogCallback | None = None, checkpoint: Path | None = None, checkpoint_key: str = "",
           engine: EngineConfig = EngineConfig()) -> InversionResult:
    """Reconstruct the batch behind `artifact`. Reads only the model, the artifact and the labels;
    `engine` chooses how the step is computed (gradinv.engine). With `checkpoint`, state is saved
    there every `checkpoint_every` iterations and a matching checkpoint found there is resumed
    (same final images as an uninterrupted run). Each iteration: the consensus when due, the
    step's inputs (gradinv.engine.seed_step), the step, the log."""
    if len(labels) != artifact.batch_size:
        raise UserError(f"{len(labels)} labels were given for a gradient of batch size {artifact.batch_size}.")
    fedavg = Objective.replayed_update(artifact) is not None
    plan = plan_step(engine, config.seeds, artifact.batch_size, fedavg)
    # How the step is computed changes the result beyond float noise over many iterations (seeds on
    # threads or one by one, batched, graphed): a checkpoint resumes only under the same plan.
    checkpoint_key = hashlib.sha256(f"{checkpoint_key}|{plan.device.type}|{plan.seeds_per_call}|"
                                    f"{plan.workers}|{plan.graphed}".encode()).hexdigest()
    device = plan.device
    labels_tensor = torch.tensor(labels, dtype=torch.int64, device=device)
    # Threads must not share a model: the BN hooks of one seed's forward would see the other's.
    copies = 1 if plan.workers == 1 else config.seeds
    built = [attacker_objective(model, artifact, labels_tensor, config, engine, device) for _ in range(copies)]
    objective = built[0]
    objectives = built * config.seeds if copies == 1 else built

    # Each seed's generator draws its starting noise, then its view of every iteration.
    generators = [torch.Generator().manual_seed(config.seed * 1000 + g) for g in range(config.seeds)]
    initial = torch.stack([torch.randn((artifact.batch_size, *artifact.meta["input_shape"]), generator=gen)
                           for gen in generators])
    box = pixel_box(artifact.meta["mean"], artifact.meta["std"], device)
    if config.grad_share:
        start = [{k: float(v.detach()) for k, v in objective.terms(x.to(device)).items()} for x in initial]
        config = dataclasses.replace(config, alpha_grad=balanced_alpha_grad(start, config))
        for built_objective in built:
            built_objective.config = config
    seeds = SeedStep(objectives, initial.to(device, copy=True), config, engine, box, plan)
    consensus: torch.Tensor | None = None
    log: list[dict] = []
    weights = as_dict(config)  # the terms' weights, for their shares of the objective
    first_step = 0
    resumed = load_checkpoint(checkpoint, checkpoint_key, seeds.optimizer.state_dict()) if checkpoint else None
    if resumed is not None:
        first_step, log = resumed.step, resumed.log
        seeds.restore(resumed.images, resumed.optimizer, resumed.noise_generator)
        for generator, state in zip(generators, resumed.generators):
            generator.set_state(state)
        if resumed.consensus is not None:
            consensus = resumed.consensus.to(device)
            seeds.set_consensus(consensus)

    start = time.perf_counter()
    with running(engine, plan) as run_seeds:
        run_step = seeds.runner(run_seeds)
        bar = progress(range(first_step, config.iterations), "invert", unit="it", initial=first_step,
                       total=config.iterations)
        for step in bar:
            if _group_refresh_due(step, config):
                consensus = fuse(seeds.images.detach(), config.registration).to(device)
                seeds.set_consensus(consensus)
            lr = learning_rate(step, config)
            seeds.fill(lr, [draw_view(config, gen) for gen in generators])
            terms = run_step(consensus is not None)
            if step % config.log_every == 0 or step == config.iterations - 1:
                values = {k: v.tolist() for k, v in terms.items()}
                refuse_non_finite(values, step, engine)
                bar.set_postfix(loss=f"{min(values['total']):.4g}", grad=f"{min(values['grad']):.4g}", refresh=False)
                for g in range(config.seeds):
                    row = with_shares({"iteration": step, "seed": g, "lr": lr, **{k: values[k][g] for k in LOSS_TERMS}},
                                      weights)
                    log.append(row)
                    if on_log is not None:
                        on_log(step, loss_metrics(row))
            done = step + 1
            if checkpoint and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
                refuse_non_finite_images(seeds.images, done, engine)
                save_checkpoint(checkpoint, checkpoint_key, InversionState(
                    done, seeds.images.detach(), seeds.optimizer.state_dict(), [gen.get_state() for gen in generators],
                    seeds.noise_generator.get_state(), consensus, log))
        seconds = time.perf_counter() - start
        final_terms = [objective.terms(x) for x in seeds.images.detach()]
    final = [float(terms["grad"].detach()) for terms in final_terms]
    final_objective = [float(terms["total"].detach()) for terms in final_terms]
    images = seeds.images.detach().cpu()
    return InversionResult(images, initial, final, final_objective, objective.zero_gradient_distance(),
                           int(torch.tensor(final).argmin()), log, seconds, config.alpha_grad)


def choose_seed(rule: str, final_grad_loss: list[float], final_objective: list[float], images: torch.Tensor,
                consensus: torch.Tensor) -> int:
    """The seed reported as the reconstruction. objective: the lowest final objective (on the
    unshifted view, without the group pull, which measures distance to the other seeds);
    gradient: the lowest final gradient distance; consensus: the seed nearest (mean squared pixel
    difference) the registered consensus."""
    if rule == "consensus":
        return int((images - consensus).pow(2).flatten(1).mean(1).argmin())
    return int(torch.tensor(final_objective if rule == "objective" else final_grad_loss).argmin())


def read_labels(labels_dir: str | Path, num_classes: int) -> list[int]:
    info = read_json(Path(labels_dir) / "labels.json", "recovered labels")
    labels = info.get("labels")
    if not isinstance(labels, list) or not all(isinstance(v, int) and 0 <= v < num_classes for v in labels):
        raise UserError(f"recovered labels in {labels_dir} must be a list of class indices below {num_classes}.")
    return labels


def run_key(gradient_file: Path, labels: list[int], config: InversionConfig, engine: EngineConfig) -> str:
    """What a checkpoint must match to be resumed: the gradient, the labels and every setting
    that changes the result (the engine's speed-only settings do not)."""
    digest = hashlib.sha256(gradient_file.read_bytes())
    settings = {k: v for k, v in as_dict(config).items() if k not in ("log_every", "checkpoint_every")}
    digest.update(json.dumps([labels, settings, result_changing(engine)], sort_keys=True).encode())
    return digest.hexdigest()


@commits("out_dir")
def run_inversion(config: InversionConfig, victim_dir: str | Path, gradient_dir: str | Path,
                  labels_dir: str | Path, out_dir: str | Path, on_log: LogCallback | None = None,
                  checkpoint_dir: str | Path | None = None, engine: EngineConfig = EngineConfig()) -> list[Path]:
    """Stage `invert`: reconstruction.safetensors (pixel space), invert.json, loss.parquet.
    Checkpoints live in `checkpoint_dir` (default: beside out_dir, outside the stage's output,
    which DVC clears before a rerun) and are removed once the outputs are written."""
    model, victim = load_victim(victim_dir)
    artifact = load_gradient(gradient_dir, model, expected={"arch": victim.arch, "num_classes": victim.num_classes,
                                                            "input_shape": victim.input_shape})
    labels = read_labels(labels_dir, victim.num_classes)
    out_dir = Path(out_dir)
    key = run_key(Path(gradient_dir) / TENSOR_FILE, labels, config, engine)
    checkpoint = Path(checkpoint_dir or out_dir.parent / ".checkpoints") / f"invert-{key[:16]}.safetensors"
    result = invert(model, artifact, labels, config, on_log, checkpoint, key, engine)
    mean, std = artifact.meta["mean"], artifact.meta["std"]
    to_pixels = lambda t: denormalize(t.flatten(0, 1), mean, std).clamp(0, 1).view_as(t)  # noqa: E731
    images = to_pixels(result.images)
    consensus = fuse(images, config.registration)
    chosen = choose_seed(config.choose, result.final_grad_loss, result.final_objective, images, consensus)
    weights = as_dict(dataclasses.replace(config, alpha_grad=result.alpha_grad))
    rows = [with_shares(row, weights) for row in result.log]  # rows resumed from a checkpoint may lack them
    shares = [f"share_{term}" for term in TERM_WEIGHTS]
    columns = {k: [row[k] for row in rows] for k in ("iteration", "seed", "lr", *LOSS_TERMS, *shares)}
    zero = result.zero_gradient_distance
    summary = {"labels": labels, "chosen_seed": chosen, "lowest_gradient_seed": result.lowest_gradient_seed,
               "alpha_grad_used": result.alpha_grad, "final_grad_loss": result.final_grad_loss,
               "final_objective": result.final_objective,
               "zero_gradient_distance": zero,
               "final_grad_relative": [f / zero if zero > 0 else None for f in result.final_grad_loss],
               "seconds": result.seconds, "seconds_per_iteration": result.seconds / config.iterations,
               "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "params": as_dict(config)}
    written = [
        # Every seed gives slot i the same label, so the slots already correspond across seeds.
        write_tensors(out_dir / RECONSTRUCTION_FILE, {"seeds": images, "chosen": images[chosen],
                                                      "consensus": consensus,
                                                      "consensus_unregistered": images.mean(0),
                                                      "initial": to_pixels(result.initial),
                                                      "labels": torch.tensor(labels)}),
        write_table(out_dir / "loss.parquet", columns),
        write_json(out_dir / "invert.json", summary),
    ]
    checkpoint.unlink(missing_ok=True)
    return written
