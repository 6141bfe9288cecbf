"""Stage `capture` (victim side): one client's FedSGD step on a private batch from the pool.

Writes two folders that never meet on the attacker side: the shared gradient artifact, and the
private ground truth that only evaluation reads."""

from __future__ import annotations

from pathlib import Path

import torch

from gradinv.artifacts import GradientArtifact, gradient_meta, save_gradient
from gradinv.client import parameter_gradients, recorded_bn_statistics, train_mode_copy
from gradinv.config import CaptureConfig
from gradinv.data import ImageSet, load_set, normalize
from gradinv.errors import UserError
from gradinv.io import write_json, write_tensors
from gradinv.victim import load_victim

TRUTH_FILE = "truth.safetensors"


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


def client_update(model, images: torch.Tensor, labels: torch.Tensor, bn_leak: str, meta_fields: dict) -> GradientArtifact:
    """The client's shared gradient (train-mode BN) plus what leaked with it."""
    client = train_mode_copy(model)
    with recorded_bn_statistics(client) as stats:
        try:
            grads = parameter_gradients(client, images, labels)
        except ValueError as err:  # train-mode BN over a single value per channel
            raise UserError(f"the client's train-mode forward fails for this batch ({err}); use a larger batch or resolution.") from None
    artifact = GradientArtifact(grads={n: g.detach() for n, g in grads.items()},
                                meta=gradient_meta(batch_size=len(labels), bn_leak=bn_leak, **meta_fields))
    if bn_leak == "exact":
        artifact.bn_mean = {n: m.detach() for n, (m, _) in stats.items()}
        artifact.bn_var = {n: v.detach() for n, (_, v) in stats.items()}
    return artifact


def capture(config: CaptureConfig, sets_dir: str | Path, victim_dir: str | Path,
            gradient_dir: str | Path, truth_dir: str | Path) -> list[Path]:
    model, victim = load_victim(victim_dir)
    pool = load_set(sets_dir, "pool")
    index = draw_batch(pool, config.batch_size, config.distinct_labels, torch.Generator().manual_seed(config.seed))
    images, labels = pool.images[index], pool.labels[index]
    meta_fields = {"arch": victim.arch, "num_classes": victim.num_classes, "input_shape": victim.input_shape,
                   "mean": victim.mean, "std": victim.std}
    artifact = client_update(model, normalize(images, victim.mean, victim.std), labels, config.bn_leak, meta_fields)
    written = save_gradient(artifact, gradient_dir)
    written.append(write_tensors(Path(truth_dir) / TRUTH_FILE, {"images": images, "labels": labels, "pool_index": index}))
    written.append(write_json(Path(truth_dir) / "truth.json", {"labels": labels.tolist(), "pool_index": index.tolist()}))
    return written
