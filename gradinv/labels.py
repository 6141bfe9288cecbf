"""Stage `labels` (attacker side): recover the batch's labels from the gradient alone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradinv.artifacts import GradientArtifact
from gradinv.config import LabelsConfig
from gradinv.errors import UserError
from gradinv.io import write_json
from gradinv.models import final_linear


def yin_labels(model: nn.Module, artifact: GradientArtifact) -> tuple[list[int], torch.Tensor]:
    """Yin et al. Eq. 8: with non-negative penultimate features, a class in the batch has a
    negative row in ∂L/∂W_FC; score_n = min_m ∂L/∂W_FC[n, m], take the K most negative.
    Assumes distinct labels. Returns (sorted labels, per-class scores)."""
    name, fc = final_linear(model)
    grad = artifact.grads[f"{name}.weight"]
    k = artifact.batch_size
    if k > fc.out_features:
        raise UserError(f"label strategy 'yin' assumes distinct labels, but the batch size {k} exceeds the {fc.out_features} classes.")
    scores = grad.min(dim=1).values
    labels = sorted(torch.topk(-scores, k).indices.tolist())
    return labels, scores


def recover_labels(config: LabelsConfig, model: nn.Module, artifact: GradientArtifact, out_dir: str | Path) -> list[Path]:
    labels, scores = yin_labels(model, artifact)
    return [write_json(Path(out_dir) / "labels.json",
                       {"strategy": config.strategy, "labels": labels, "scores": scores.tolist()})]
