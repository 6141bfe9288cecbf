"""What a client's BatchNorm buffers give away. Every train-mode forward moves a layer's running
statistics by momentum m towards the batch's: mean_new = (1 − m)·mean_old + m·batch_mean, and the
same for the variance with the batch's unbiased variance. After one local step both are exact:
batch_mean = (mean_new − (1 − m)·mean_old) / m. After S steps, the same inversion with (1 − m)^S
gives the momentum-weighted average of the S mini-batches' statistics (weights m(1 − m)^(S − s),
renormalised): an approximation of the whole batch's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradinv.client.models import batchnorm_layers
from gradinv.errors import UserError


@dataclass
class DerivedStatistics:
    mean: dict[str, torch.Tensor]  # per layer: the batch mean (exact) or the steps' weighted mean
    var: dict[str, torch.Tensor]   # per layer: the biased batch variance, as gradinv artifacts store it
    steps: int
    exact: bool


def elements_per_channel(model: nn.Module, input_shape: list[int], batch: int) -> dict[str, int]:
    """How many values each BN layer averages per channel for a batch of `batch` inputs."""
    counts: dict[str, int] = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, i[0].numel() // i[0].shape[1]))
             for name, bn in batchnorm_layers(model).items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *input_shape, dtype=next(model.parameters()).dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def derive_batch_statistics(model: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                            steps: int, input_shape: list[int], batch: int) -> DerivedStatistics:
    """From the BN buffers before (the global model) and after (the reply) `steps` local steps
    over mini-batches of `batch` examples each (the whole batch when steps is 1)."""
    layers = batchnorm_layers(model)
    counts = elements_per_channel(model, input_shape, batch)
    means, variances = {}, {}
    for name, bn in layers.items():
        if bn.momentum is None:
            raise UserError(f"BatchNorm layer '{name}' keeps a cumulative average (momentum None); its running "
                            "statistics cannot be inverted to batch statistics.")
        keep = (1 - bn.momentum) ** steps
        weight = 1 - keep
        means[name] = (after[f"{name}.running_mean"].double() - keep * before[f"{name}.running_mean"].double()) / weight
        unbiased = (after[f"{name}.running_var"].double() - keep * before[f"{name}.running_var"].double()) / weight
        n = counts[name]
        variances[name] = (unbiased * (n - 1) / n).clamp_min(0)
    return DerivedStatistics({k: v.float() for k, v in means.items()}, {k: v.float() for k, v in variances.items()},
                             steps, steps == 1)
