"""The GradInversion objective (Yin et al. 2021) for one seed's batch of images:

    α_G · D(∇_W L(x̂, ŷ), ΔW) + α_tv TV(x̂) + α_l2 ‖x̂‖₂ + α_BN R_BN(x̂) + α_group ‖x̂ − E‖₂

D is the per-layer gradient distance (paper: Σ_l ‖·‖₂, not squared; squared L2, L2 relative to
each layer's target norm and cosine are offered too), R_BN matches each BatchNorm layer's batch
statistics to the leaked (BN_exact) or running (BN_approx) ones, and E is the group consensus of all seeds. The forward runs in the
client's own train mode (gradinv.client.step), so x̂ is judged by the function the client used.
Against declared defenses the attacker knows of, ∇_W L is replaced by what the client shared:
only the transmitted entries under top-k pruning, and the replayed local update under FedAvg.

The attacker's model may carry the engine's layers (gradinv.engine.attacker_model): the same
function with a cheaper second derivative.

`batched_terms` evaluates several seeds in one call (torch.func.vmap over the seeds, per-seed BN
statistics), the same function as `terms` seed by seed: on a GPU, one large launch instead of G
small ones."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradinv.client.artifacts import GradientArtifact
from gradinv.client.defenses import as_gradient, private_update, shared_update, transmitted_mask
from gradinv.client.models import batchnorm_layers
from gradinv.client.step import local_update, parameter_gradients, recorded_bn_statistics
from gradinv.errors import UserError
from gradinv.pipeline.config import InversionConfig

LOSS_TERMS = ("total", "grad", "tv", "l2", "bn", "group")
TERM_WEIGHTS = {"grad": "alpha_grad", "tv": "alpha_tv", "l2": "alpha_l2", "bn": "alpha_bn", "group": "alpha_group"}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x[..., 1:, :] - x[..., :-1, :]) + torch.linalg.vector_norm(x[..., :, 1:] - x[..., :, :-1])


def _same_shape_groups(tensors: dict[str, torch.Tensor], weight_of: Callable[[int, str], float]
                       ) -> tuple[dict[tuple, list[str]], list[str]]:
    """{(shape, weight): names} of the one-dimensional tensors, and the names of the others.

    The distances of per-channel vectors (BatchNorm's statistics, weights and biases; biases) are
    computed for all of one shape and weight at once: a stack and a few operations per group
    instead of several operations per layer. Where each operation is a GPU kernel, its launch
    costs more than its work on such vectors: ResNet-50 has 53 BatchNorm layers (6 widths) and 107
    one-dimensional parameters (7 shapes). Weights stay per layer: stacked, their gradients would
    reach the convolutions' double backward as strided slices, to be copied."""
    groups: dict[tuple, list[str]] = {}
    others = []
    for index, (name, tensor) in enumerate(tensors.items()):
        if tensor.dim() == 1:
            groups.setdefault((tuple(tensor.shape), weight_of(index, name)), []).append(name)
        else:
            others.append(name)
    return groups, others


def bn_distance(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                first_bn_multiplier: float, zero: torch.Tensor) -> torch.Tensor:
    """R_BN: Σ_l ‖μ_l − μ̂_l‖ + ‖σ²_l − σ̂²_l‖ over the BN layers in `targets`, the first ×multiplier;
    the layers of one width and weight at once."""
    groups, _ = _same_shape_groups({n: mean for n, (mean, _) in targets.items()},
                                   lambda index, _: first_bn_multiplier if index == 0 else 1.0)
    total = zero
    for (_, weight), names in groups.items():
        distance = sum(torch.linalg.vector_norm(torch.stack([stats[n][k] for n in names])
                                                - torch.stack([targets[n][k] for n in names]), dim=-1)
                       for k in (0, 1))
        total = total + weight * distance.sum()
    return total


def layer_weight(name: str, weights: dict[str, float]) -> float:
    """The weight of parameter `name`: that of the longest matching prefix in `weights`, else 1."""
    matches = [prefix for prefix in weights if name.startswith(prefix)]
    return float(weights[max(matches, key=len)]) if matches else 1.0


def target_norms(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """‖ΔW_l‖ of every layer, kept above float's smallest normal: l2_relative's denominators."""
    return {n: torch.linalg.vector_norm(t).clamp_min(torch.finfo(t.dtype).tiny) for n, t in target.items()}


def gradient_distance(grads: dict[str, torch.Tensor], target: dict[str, torch.Tensor], kind: str,
                      weights: dict[str, float], norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """D(∇W, ΔW) of kind l2 (Σ_l w_l‖∇W_l − ΔW_l‖), squared_l2, l2_relative (each layer's distance
    divided by ‖ΔW_l‖, so that every layer counts alike at any scale of the gradient; `norms`
    passes target_norms(target) computed once) or cosine."""
    if kind == "cosine":  # Geiping et al.: 1 − cosine similarity over all (weighted) layers at once
        dot = sum(layer_weight(n, weights) * (grads[n] * t).sum() for n, t in target.items())
        norm_g = sum(layer_weight(n, weights) * grads[n].pow(2).sum() for n in target)
        norm_t = sum(layer_weight(n, weights) * t.pow(2).sum() for n, t in target.items())
        return 1 - dot / (norm_g.sqrt() * norm_t.sqrt()).clamp_min(1e-12)
    squared, relative = kind == "squared_l2", kind == "l2_relative"
    if relative and norms is None:
        norms = target_norms(target)
    groups, others = _same_shape_groups(target, lambda _, name: layer_weight(name, weights))
    total = sum(layer_weight(n, weights) * layer_distance(grads[n], target[n], squared) / (norms[n] if relative else 1)
                for n in others)
    for (_, weight), names in groups.items():
        distances = layer_distance(torch.stack([grads[n] for n in names]), torch.stack([target[n] for n in names]),
                                   squared, stacked=True)
        if relative:
            distances = distances / torch.stack([norms[n] for n in names])
        total = total + weight * distances.sum()
    return total


def layer_distance(grad: torch.Tensor, target: torch.Tensor, squared: bool, stacked: bool = False) -> torch.Tensor:
    """‖grad − target‖₂, or its square; with `stacked`, that of each slice along the first dimension.
    Spelled through mse_loss, whose backward is one fused pass over the two tensors, where
    vector_norm(grad − target)'s backward makes three over their difference (on a CPU, passes over
    parameter-sized tensors are a visible part of the step: `python benchmarks/step_profile.py
    --device cpu --arch resnet18 --px 32 --seeds 1 --bn-double-backward pytorch`).
    The square root's argument is kept above float's smallest normal, where a layer matched
    exactly (or masked out entirely) gets the zero gradient the norm's would give, not NaN."""
    if stacked:
        sum_of_squares = F.mse_loss(grad, target, reduction="none").flatten(1).sum(1)
    else:
        sum_of_squares = F.mse_loss(grad, target, reduction="sum")
    if squared:
        return sum_of_squares
    return sum_of_squares.clamp_min(torch.finfo(sum_of_squares.dtype).tiny).sqrt()


class Objective:
    """The objective for one batch, against one gradient artifact. `model` is the attacker's own
    train-mode copy (gradinv.client.step.train_mode_copy), on the labels' device."""

    def __init__(self, model: nn.Module, artifact: GradientArtifact, labels: torch.Tensor, config: InversionConfig):
        device = labels.device
        self.model = model
        self.labels = labels
        self.config = config
        defenses = artifact.meta.get("defenses", [])
        update = private_update(defenses)
        if update is not None and update["known_to_attacker"]:  # several DP-SGD steps: their mean gradient
            self.target = {n: as_gradient(g, defenses, artifact.batch_size).to(device) for n, g in artifact.grads.items()}
        else:
            self.target = {n: g.to(device) for n, g in artifact.grads.items()}
        # Pruning the attacker knows of: only the transmitted entries are matched.
        self.mask = transmitted_mask(self.target, defenses)
        # FedAvg the attacker knows of: the candidate batch's local update is replayed and matched.
        self.fedavg = self.replayed_update(artifact)
        self.bn_targets = self._bn_targets(model, artifact, config.bn_prior, device)
        self.norms = target_norms(self.target) if config.gradient_distance == "l2_relative" else None

    @staticmethod
    def replayed_update(artifact: GradientArtifact) -> dict | None:
        """The FedAvg update the attacker knows of and replays (its steps, lr and batch size), or None."""
        fedavg = shared_update(artifact.meta.get("defenses", []))
        return fedavg if fedavg is not None and fedavg["known_to_attacker"] else None

    @staticmethod
    def _bn_targets(model, artifact, prior: str, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if prior == "none":
            return {}
        layers = batchnorm_layers(model)
        if not layers:
            raise UserError(f"the BN prior (inversion.bn_prior: {prior}) needs BatchNorm layers, and the model has none.")
        if prior == "exact":
            if not artifact.has_bn_statistics:
                raise UserError("inversion.bn_prior 'exact' needs the batch's BN statistics, but the gradient artifact has none (use 'approx').")
            return {n: (artifact.bn_mean[n].to(device), artifact.bn_var[n].to(device)) for n in layers}
        return {n: (bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for n, bn in layers.items()}

    def terms(self, x: torch.Tensor, consensus: torch.Tensor | None = None,
              view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every term for images x; the model sees view(x) (jitter, flips), the priors see x."""
        with recorded_bn_statistics(self.model) as stats:
            seen = view(x) if view else x
            if self.fedavg is not None:
                f = self.fedavg
                grads = local_update(self.model, seen, self.labels, f["steps"], f["lr"], f["batch_size"], create_graph=True)
            else:
                grads = parameter_gradients(self.model, seen, self.labels, create_graph=True)
        return self._combine(x, grads, stats, consensus)

    def batched_terms(self, xs: torch.Tensor, seen: torch.Tensor | None = None,
                      consensus: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`terms` of G seeds at once: xs and the model's views `seen` are (G, B, C, H, W); every
        term comes back shaped (G,). Differentiable in xs like `terms`."""
        if self.fedavg is not None:
            raise UserError("seeds cannot be batched against a FedAvg update (set engine.seed_batch: 1).")
        seen = xs if seen is None else seen
        model, params = self._functional_model()

        def one_seed(x: torch.Tensor, x_seen: torch.Tensor) -> dict[str, torch.Tensor]:
            def loss(weights):
                with recorded_bn_statistics(model) as stats:
                    out = torch.func.functional_call(model, weights, (x_seen,))
                return F.cross_entropy(out, self.labels), dict(stats)

            grads, stats = torch.func.grad(loss, has_aux=True)(params)
            return self._combine(x, grads, stats, consensus)

        return torch.func.vmap(one_seed)(xs, seen)

    def _functional_model(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A copy of the model for torch.func: BN keeps no running statistics (in train mode it
        normalises with the batch's own either way; vmap forbids the in-place update)."""
        if not hasattr(self, "_functional"):
            model = copy.deepcopy(self.model)
            torch.func.replace_all_batch_norm_modules_(model)
            self._functional = (model, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        return self._functional

    def zero_gradient_distance(self) -> float:
        """The gradient distance of an all-zero gradient: the target's own size in the distance the
        attack matches (Σ_l w_l‖ΔW_l‖ for l2; 1 for cosine), against which a final distance reads."""
        zeros = {n: torch.zeros_like(t) for n, t in self.target.items()}
        return float(gradient_distance(zeros, self.target, self.config.gradient_distance, self.config.layer_weights,
                                       self.norms))

    def _combine(self, x: torch.Tensor, grads: dict[str, torch.Tensor], stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 consensus: torch.Tensor | None) -> dict[str, torch.Tensor]:
        c = self.config
        if self.mask is not None:
            grads = {n: g * self.mask[n] for n, g in grads.items()}
        bn = bn_distance(stats, self.bn_targets, c.first_bn_multiplier, x.new_zeros(()))
        terms = {
            "grad": gradient_distance(grads, self.target, c.gradient_distance, c.layer_weights, self.norms),
            "tv": total_variation(x), "l2": torch.linalg.vector_norm(x), "bn": bn,
            "group": torch.linalg.vector_norm(x - consensus) if consensus is not None else x.new_zeros(()),
        }
        terms["total"] = sum(getattr(c, weight) * terms[term] for term, weight in TERM_WEIGHTS.items())
        return terms


def balanced_alpha_grad(start_terms: list[dict[str, float]], config: InversionConfig) -> float:
    """α_G that makes the gradient term `config.grad_share` (s) of the objective on the starting
    noise: α_G · D̄ = s / (1 − s) · Σ_{k ≠ G} α_k T̄_k, the bars meaning means over the seeds'
    `start_terms` (no group term: there is no consensus yet). The other terms keep their weights."""
    share = config.grad_share
    mean = {term: sum(row[term] for row in start_terms) / len(start_terms) for term in TERM_WEIGHTS}
    priors = sum(getattr(config, weight) * mean[term] for term, weight in TERM_WEIGHTS.items() if term != "grad")
    if mean["grad"] <= 0 or priors <= 0:
        raise UserError("inversion.grad_share needs a gradient term and another weighted term above zero on the "
                        "starting noise; set grad_share 0 to keep alpha_grad as given.")
    return share / (1 - share) * priors / mean["grad"]


def term_shares(row: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Each weighted term's share of the objective in one row of the loss table (weights: the
    inversion settings, `alpha_grad` and the others)."""
    weighted = {term: weights[weight] * row[term] for term, weight in TERM_WEIGHTS.items()}
    total = sum(weighted.values())
    return {term: value / total if total else 0.0 for term, value in weighted.items()}


def with_shares(row: dict, weights: dict[str, float]) -> dict:
    """A loss-table row with each weighted term's share of the objective as `share_<term>`."""
    return {**row, **{f"share_{term}": share for term, share in term_shares(row, weights).items()}}


def loss_metrics(row: dict) -> dict[str, float]:
    """A loss-table row as tracking metrics named loss/<term>/seed<g> (and share/<term>/seed<g>
    where the row has the shares), so that a tracking UI overlays the seeds of each term."""
    metrics = {f"loss/{term}/seed{row['seed']}": row[term] for term in LOSS_TERMS}
    metrics.update({f"share/{term}/seed{row['seed']}": row[f"share_{term}"] for term in TERM_WEIGHTS
                    if f"share_{term}" in row})
    return metrics
