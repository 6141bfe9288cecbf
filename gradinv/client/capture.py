"""Stage `capture` (victim side): one client's FedSGD step on a private batch from the pool.

Writes two folders that never meet on the attacker side: the shared gradient artifact, and the
private ground truth that only evaluation reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gradinv.client.artifacts import GradientArtifact, gradient_meta, write_gradient
from gradinv.client.data import ImageSet, load_set, normalize
from gradinv.client.defenses import apply as apply_defenses
from gradinv.client.defenses import validate as validate_defenses
from gradinv.client.dp import dp_sgd_gradient, dp_sgd_update, refuse_batch_coupled
from gradinv.client.step import (local_update, parameter_gradients, per_example_gradients, recorded_bn_statistics,
                                 train_mode_copy)
from gradinv.client.victim import load_victim
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.io import write_json, write_tensors
from gradinv.pipeline.config import CaptureConfig

TRUTH_FILE = "truth.safetensors"
OPT_IN = (", or set 'batch_coupled: true' on the defense to clip the batch-coupled per-sample gradients anyway "
          "(the report then says 'not DP')")


def draw_batch(pool: ImageSet, batch_size: int, distinct_labels: bool, generator: torch.Generator) -> torch.Tensor:
    """Indices into the pool: a random batch, with one image per label if `distinct_labels`."""
    if not distinct_labels:
        if batch_size > len(pool.labels):
            raise UserError(f"params: 'capture.batch_size' {batch_size} exceeds the pool size {len(pool.labels)}.")
        return torch.randperm(len(pool.labels), generator=generator)[:batch_size]
    classes = pool.labels.unique()
    if batch_size > len(classes):
        raise UserError(f"params: 'capture.batch_size' {batch_size} exceeds the {len(classes)} classes available for distinct labels.")
    chosen = classes[torch.randperm(len(classes), generator=generator)[:batch_size]]
    picks = []
    for label in chosen.tolist():
        members = (pool.labels == label).nonzero().flatten()
        picks.append(members[torch.randint(len(members), (), generator=generator)])
    return torch.stack(picks)


def client_update(model, images: torch.Tensor, labels: torch.Tensor, bn_leak: str, meta_fields: dict,
                  defenses: list[dict] = (), generator: torch.Generator | None = None) -> GradientArtifact:
    """What the client shares (train-mode BN): the batch gradient, or under `fedavg` its local
    weight update, or under `dp_sgd` the noisy clipped mean of per-sample gradients (Opacus), or
    under `per_example_clip` their clipped mean; then the remaining defenses in order; plus what
    leaked with it."""
    defenses = list(defenses)
    client = train_mode_copy(model)
    first = defenses[0] if defenses else {"kind": None}
    try:
        with recorded_bn_statistics(client) as stats:
            if first["kind"] == "fedavg":
                shared = local_update(client, images, labels, first["steps"], first["lr"], first["batch_size"])
            elif first["kind"] in ("per_example_clip", "dp_sgd"):
                with torch.no_grad():
                    client(images)  # the batch statistics; the per-sample gradients see the same batch
            else:
                shared = parameter_gradients(client, images, labels)
        # Outside the hooks: the per-sample gradients run the forward again.
        if first["kind"] == "dp_sgd" and first["local_steps"] > 1:
            shared = dp_sgd_update(client, images, labels, first["noise_multiplier"], first["max_grad_norm"],
                                   first["local_steps"], first["lr"], generator)
        elif first["kind"] == "dp_sgd":
            shared = dp_sgd_gradient(client, images, labels, first["noise_multiplier"], first["max_grad_norm"], generator)
        elif first["kind"] == "per_example_clip" and first.get("batch_coupled"):
            shared = clipped_mean(per_example_gradients(client, images, labels), first["norm"])
        elif first["kind"] == "per_example_clip":
            refuse_batch_coupled(client, "per_example_clip", opt_in=OPT_IN)
            shared = dp_sgd_gradient(client, images, labels, 0.0, first["norm"])
    except ValueError as err:  # train-mode BN over a single value per channel
        raise UserError(f"the client's train-mode forward fails for this batch ({err}); use a larger batch or resolution.") from None
    shared = {n: g.detach() for n, g in shared.items()}
    if defenses:
        shared = apply_defenses(shared, defenses, generator or torch.Generator().manual_seed(0))
    meta = gradient_meta(batch_size=len(labels), bn_leak=bn_leak, **meta_fields)
    meta.update(defenses=defenses, aggregation_clients=1)
    artifact = GradientArtifact(grads=shared, meta=meta)
    if bn_leak == "exact":
        artifact.bn_mean = {n: m.detach() for n, (m, _) in stats.items()}
        artifact.bn_var = {n: v.detach() for n, (_, v) in stats.items()}
    return artifact


def clip_per_example(per_example: dict[str, torch.Tensor], norm: float) -> dict[str, torch.Tensor]:
    """DP-SGD: each sample's whole gradient (all tensors together) scaled to L2 norm ≤ `norm`."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_example.values()]).sum(0).sqrt()
    factor = (norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return {n: g * factor.view(-1, *[1] * (g.ndim - 1)) for n, g in per_example.items()}


def clipped_mean(per_example: dict[str, torch.Tensor], norm: float) -> dict[str, torch.Tensor]:
    return {n: g.mean(0) for n, g in clip_per_example(per_example, norm).items()}


def securely_aggregated(updates: list[GradientArtifact]) -> GradientArtifact:
    """Secure aggregation: the server sees only the mean of the clients' updates (and of their
    BN statistics, when those are shared); the first update is the victim's."""
    mean = lambda dicts: {n: torch.stack([d[n] for d in dicts]).mean(0) for n in dicts[0]}  # noqa: E731
    victim = updates[0]
    meta = {**victim.meta, "aggregation_clients": len(updates)}
    return GradientArtifact(grads=mean([u.grads for u in updates]), meta=meta,
                            bn_mean=mean([u.bn_mean for u in updates]) if victim.bn_mean else {},
                            bn_var=mean([u.bn_var for u in updates]) if victim.bn_var else {})


@commits("gradient_dir", "truth_dir")
def capture(config: CaptureConfig, sets_dir: str | Path, victim_dir: str | Path,
            gradient_dir: str | Path, truth_dir: str | Path) -> list[Path]:
    model, victim = load_victim(victim_dir)
    pool = load_set(sets_dir, "pool")
    generator = torch.Generator().manual_seed(config.seed)
    index = draw_batch(pool, config.batch_size, config.distinct_labels, generator)
    images, labels = pool.images[index], pool.labels[index]
    meta_fields = dataclasses.asdict(victim)  # arch, classes, input shape, normalisation
    defenses = validate_defenses(config.defenses)
    noise = torch.Generator().manual_seed(config.seed + 7919)  # the clients' noise, apart from the batch draws
    updates = []
    for client in range(config.aggregation_clients):
        # The victim's batch first; the other clients' batches are further draws from the pool.
        batch = index if client == 0 else draw_batch(pool, config.batch_size, config.distinct_labels, generator)
        updates.append(client_update(model, normalize(pool.images[batch], victim.mean, victim.std), pool.labels[batch],
                                     config.bn_leak, meta_fields, defenses, noise))
    artifact = updates[0] if len(updates) == 1 else securely_aggregated(updates)
    written = write_gradient(artifact, gradient_dir)
    written.append(write_tensors(Path(truth_dir) / TRUTH_FILE, {"images": images, "labels": labels, "pool_index": index}))
    written.append(write_json(Path(truth_dir) / "truth.json", {"labels": labels.tolist(), "pool_index": index.tolist()}))
    return written
