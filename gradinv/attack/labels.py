"""Stage `labels` (attacker side): recover the batch's labels from the gradient and the model.

Strategies (params.yaml `labels.strategy`):
- `yin`:    Yin et al. Eq. 8. With non-negative penultimate features, a class present in the batch
            has negative entries in its row of ∂L/∂W_FC; score_n = min_m ∂L/∂W_FC[n, m] and the K
            most negative scores are the labels. Assumes K distinct labels.
- `idlg`:   iDLG, batch of one: the only row whose bias gradient is negative.
- `counts`: labels with multiplicities, for batches that repeat labels (see `count_labels`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradinv.client.artifacts import GradientArtifact, load_gradient
from gradinv.client.defenses import as_gradient
from gradinv.client.models import final_linear, penultimate_features
from gradinv.client.step import recorded_bn_statistics, train_mode_copy
from gradinv.client.victim import load_victim
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.io import write_json
from gradinv.pipeline.config import LabelsConfig
from gradinv.progress import progress


def _head_gradients(model: nn.Module, artifact: GradientArtifact, strategy: str, need_bias: bool):
    name, fc = final_linear(model)
    weight_grad = as_gradient(artifact.grads[f"{name}.weight"], artifact.meta.get("defenses", []), artifact.batch_size)
    if not need_bias:
        return fc, weight_grad, None
    if fc.bias is None:
        raise UserError(f"label strategy '{strategy}' needs a bias in the final Linear layer '{name}', and it has none.")
    return fc, weight_grad, as_gradient(artifact.grads[f"{name}.bias"], artifact.meta.get("defenses", []),
                                        artifact.batch_size)


def check_nonnegative_features(model: nn.Module, input_shape: list[int], strategy: str, probes: int = 4) -> None:
    """The sign argument behind `yin` needs features ≥ 0 entering the final Linear (ReLU then
    pooling). Probe the model with random inputs and refuse when a feature comes out negative."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((probes, *input_shape), generator=generator)
    features = penultimate_features(model, probe.to(next(model.parameters()).device))
    if (features < 0).any():
        raise UserError(f"label strategy '{strategy}' needs non-negative features before the final Linear layer, "
                        "and this model produces negative ones.")


def yin_labels(model: nn.Module, artifact: GradientArtifact) -> tuple[list[int], torch.Tensor]:
    """Returns (sorted labels, per-class scores)."""
    fc, weight_grad, _ = _head_gradients(model, artifact, "yin", need_bias=False)
    k = artifact.batch_size
    if k > fc.out_features:
        raise UserError(f"label strategy 'yin' assumes distinct labels, but the batch size {k} exceeds the {fc.out_features} classes.")
    check_nonnegative_features(model, artifact.meta["input_shape"], "yin")
    scores = weight_grad.min(dim=1).values
    return sorted(torch.topk(-scores, k).indices.tolist()), scores


def idlg_label(model: nn.Module, artifact: GradientArtifact) -> tuple[list[int], torch.Tensor]:
    """Batch of one: ∂L/∂b = softmax − onehot is negative exactly at the true class."""
    if artifact.batch_size != 1:
        raise UserError(f"label strategy 'idlg' needs a batch of one, and the gradient's batch size is {artifact.batch_size}.")
    _, _, bias_grad = _head_gradients(model, artifact, "idlg", need_bias=True)
    return [int(bias_grad.argmin())], bias_grad


def round_to_total(values: torch.Tensor, total: int, minimum: torch.Tensor) -> torch.Tensor:
    """Non-negative integers close to `values` that sum to `total` (largest remainders), with
    at least `minimum` each."""
    values = values.clamp_min(0).double()
    counts = torch.maximum(values.floor(), minimum.double())
    while counts.sum() > total:  # take back from the most over-rounded
        excess = torch.where(counts > minimum, counts - values, torch.full_like(values, -float("inf")))
        counts[excess.argmax()] -= 1
    while counts.sum() < total:
        counts[(values - counts).argmax()] += 1
    return counts.long()


def dummy_posterior(model: nn.Module, artifact: GradientArtifact, batches: int = 4, seed: int = 0) -> torch.Tensor:
    """Mean softmax of the model on N(0, 1) inputs, in the client's BN mode (train: batch
    statistics over a dummy batch of the same size): the attacker's stand-in for p̄."""
    client = train_mode_copy(model)
    device = next(client.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (max(artifact.batch_size, 2), *artifact.meta["input_shape"])
    with torch.no_grad():
        means = [torch.softmax(client(torch.randn(shape, generator=generator).to(device)), 1).mean(0).double().cpu()
                 for _ in range(batches)]
    return torch.stack(means).mean(0)


def standardized_bn_distance(stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             targets: dict[str, tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-5) -> torch.Tensor:
    """Σ_l RMS_c((μ̂_lc − μ_lc) / σ_lc) + RMS_c(log σ̂²_lc − log σ²_lc): each channel's mean
    error in units of its own standard deviation, its variance error as a log ratio (eps as in
    BatchNorm). Every channel and layer weighs the same whatever its scale, so the deep layers,
    which carry the batch's classes, are matched as tightly as the first (the inversion's
    absolute R_BN leaves them loosest: docs/label_accuracy.md)."""
    total = 0.0
    for name, (mean, var) in targets.items():
        batch_mean, batch_var = stats[name]
        total = total + (((batch_mean - mean) / (var + eps).sqrt()).pow(2).mean().sqrt()
                         + ((batch_var + eps).log() - (var + eps).log()).pow(2).mean().sqrt())
    return total


def match_bn_statistics(model: nn.Module, bn_means: dict[str, torch.Tensor], bn_vars: dict[str, torch.Tensor],
                        batch_size: int, input_shape: list[int], steps: int, seed: int = 0, lr: float = 0.2,
                        show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Surrogate batches whose BatchNorm statistics match given ones, and the model's logits on them.

    bn_means / bn_vars hold K target statistics per BN layer, shaped (K, C). K batches of N(0, 1)
    images move by Adam (cosine-decayed learning rate) on `standardized_bn_distance`, all K at once
    (torch.func.vmap, each batch with its own BN statistics, as the client's train mode computes
    them); returns the images (K, batch_size, *input_shape) and their logits in that mode,
    (K, batch_size, classes)."""
    client = train_mode_copy(model)
    torch.func.replace_all_batch_norm_modules_(client)  # vmap forbids updating running statistics
    device = next(client.parameters()).device
    weights = {n: p.detach() for n, p in client.named_parameters()}
    count = next(iter(bn_means.values())).shape[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((count, batch_size, *input_shape), generator=generator).to(device).requires_grad_(True)

    def run(images, means, variances):
        with recorded_bn_statistics(client) as stats:
            logits = torch.func.functional_call(client, weights, (images,))
        targets = {n: (means[n], variances[n]) for n in means}
        return standardized_bn_distance(stats, targets), logits

    batched = torch.func.vmap(run)
    means = {n: m.to(device) for n, m in bn_means.items()}
    variances = {n: v.to(device) for n, v in bn_vars.items()}
    optimizer = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in progress(range(steps), "labels: BN-matched batch", leave=False, disable=not show_progress):
        losses, _ = batched(x, means, variances)
        (x.grad,) = torch.autograd.grad(losses.sum(), x)
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return x.detach(), batched(x, means, variances)[1]


def bn_matched_posterior(model: nn.Module, artifact: GradientArtifact, steps: int,
                         restarts: int = LabelsConfig.posterior_restarts, seed: int = 0) -> torch.Tensor:
    """Mean softmax of `restarts` surrogate batches matched to the BN statistics that leaked with
    the gradient (`match_bn_statistics`), read in the client's train mode. Deep layers' statistics
    carry what the batch shows, so this p̄ follows the real batch's predictions where noise
    cannot (docs/label_accuracy.md)."""
    expand = lambda stats: {n: t.expand(restarts, -1) for n, t in stats.items()}  # noqa: E731
    _, logits = match_bn_statistics(model, expand(artifact.bn_mean), expand(artifact.bn_var), artifact.batch_size,
                                    artifact.meta["input_shape"], steps, seed)
    return torch.softmax(logits.double(), -1).mean((0, 1)).cpu()


def posterior_source(artifact: GradientArtifact, steps: int) -> str:
    """How `counts` estimates p̄: from a BN-matched surrogate batch when the artifact carries the
    batch's BN statistics and steps > 0, else from noise."""
    return "bn_matched" if steps and artifact.has_bn_statistics else "noise"


def batch_posterior(model: nn.Module, artifact: GradientArtifact, steps: int,
                    restarts: int = LabelsConfig.posterior_restarts) -> tuple[torch.Tensor, str]:
    """The attacker's estimate of p̄, and its `posterior_source`."""
    source = posterior_source(artifact, steps)
    if source == "bn_matched":
        return bn_matched_posterior(model, artifact, steps, restarts), source
    return dummy_posterior(model, artifact), source


def count_labels(model: nn.Module, artifact: GradientArtifact, posterior: torch.Tensor | None = None,
                 posterior_steps: int = 0,
                 posterior_restarts: int = LabelsConfig.posterior_restarts) -> tuple[list[int], torch.Tensor]:
    """Labels with multiplicities from the last layer's bias gradient (impact estimation).

    For mean cross-entropy over B samples, ∂L/∂b = p̄ − n/B, with p̄ the batch's mean softmax
    and n the label counts, so n = B (p̄ − ∂L/∂b) exactly. p̄ is estimated (`batch_posterior`)
    from surrogate batches whose BN statistics match the leaked ones (`posterior_steps` of
    Adam, mean over `posterior_restarts` of them), or, without leaked statistics, from the
    model's mean softmax on noise: accurate when the posteriors depend little on the input
    (untrained or early models), poor for confident trained ones. The estimate is rounded to
    integers summing to B; a class with a negative bias gradient (certainly present) keeps at
    least one label. `posterior` replaces the estimate of p̄. Returns (labels, real-valued counts)."""
    fc, _, bias_grad = _head_gradients(model, artifact, "counts", need_bias=True)
    batch = artifact.batch_size
    bias_grad = bias_grad.double()
    if posterior is None:
        posterior, _ = batch_posterior(model, artifact, posterior_steps, posterior_restarts)
    estimate = batch * (posterior.double() - bias_grad)
    counts = round_to_total(estimate, batch, (bias_grad < 0).double())
    labels = sorted(int(c) for c, n in enumerate(counts.tolist()) for _ in range(n))
    return labels, estimate


STRATEGIES = {  # name -> (model, artifact, labels config) -> (labels, scores)
    "yin": lambda model, artifact, _: yin_labels(model, artifact),
    "idlg": lambda model, artifact, _: idlg_label(model, artifact),
    "counts": lambda model, artifact, config: count_labels(model, artifact, posterior_steps=config.posterior_steps,
                                                           posterior_restarts=config.posterior_restarts),
}


def recover(strategy: str, model: nn.Module, artifact: GradientArtifact,
            config: LabelsConfig | None = None) -> tuple[list[int], torch.Tensor]:
    return STRATEGIES[strategy](model, artifact, config or LabelsConfig())


def _epsilon(dp_sgd: dict) -> str:
    return "∞" if dp_sgd["epsilon"] is None else f"{dp_sgd['epsilon']:.3g}"


def defense_warnings(strategy: str, defenses: list[dict], clients: int, batch_size: int = 1) -> list[str]:
    """Where the declared defenses break an assumption of `strategy`, one sentence each."""
    found = []
    for d in defenses:
        kind = d["kind"]
        if kind == "fedavg" and (d["steps"] > 1 or d["batch_size"] < batch_size):
            found.append(f"the shared update sums {d['steps']} local epoch(s) of mini-batches of {d['batch_size']} at "
                         f"moving weights; read as one gradient it is approximate for strategy '{strategy}'.")
        elif kind == "dp_sgd":
            found.append(f"DP-SGD clips each sample's gradient to {d['max_grad_norm']:g} and adds noise of std "
                         f"{d['noise_multiplier']:.3g} × that norm (ε {_epsilon(d)} at δ {d['delta']:g}), so strategy "
                         f"'{strategy}' reads a reweighted, noisy mix of the samples.")
        elif kind == "per_example_clip":
            found.append(f"per-example clipping rescales each sample's gradient, so strategy '{strategy}' reads "
                         "a reweighted mix of the samples.")
        elif kind in ("gaussian", "laplace") and d["sigma"] > 0:
            found.append(f"{kind} noise (sigma {d['sigma']:g}) changes the signs and sizes that strategy '{strategy}' reads "
                         "from the last layer's gradient, so labels may be wrong once the noise rivals the gradient.")
        elif kind == "topk" and d["keep"] < 1:
            found.append(f"top-k pruning (keep {d['keep']:g}) zeroes entries of the last layer's gradient, so a present "
                         f"class whose entries were dropped looks absent to strategy '{strategy}'.")
        elif kind == "quantize" and d["to"] in ("sign", "int8"):
            found.append(f"{d['to']} quantization coarsens the last layer's gradient: ties and lost magnitudes can "
                         f"change what strategy '{strategy}' ranks.")
        elif kind == "clip" and strategy == "counts":
            found.append("clipping rescales the bias gradient, whose size strategy 'counts' turns into label counts.")
    if clients > 1:
        found.append(f"the gradient is the mean of {clients} clients' updates (secure aggregation): the labels read from it "
                     "are those of all their batches, not the victim's alone.")
    return found


@commits("out_dir")
def recover_labels(config: LabelsConfig, model: nn.Module, artifact: GradientArtifact, out_dir: str | Path) -> list[Path]:
    labels, scores = recover(config.strategy, model, artifact, config)
    warnings = defense_warnings(config.strategy, artifact.meta.get("defenses", []),
                                artifact.meta.get("aggregation_clients", 1), artifact.batch_size)
    for warning in warnings:
        print(f"gradinv: warning: {warning}")
    info = {"strategy": config.strategy, "labels": labels, "scores": scores.tolist(), "assumption_warnings": warnings}
    if config.strategy == "counts":  # how p̄ was estimated
        info["posterior"] = posterior_source(artifact, config.posterior_steps)
    return [write_json(Path(out_dir) / "labels.json", info)]


def run_labels(config: LabelsConfig, victim_dir: str | Path, gradient_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Stage `labels`: labels.json from the victim model and the gradient artifact alone."""
    model, meta = load_victim(victim_dir)
    artifact = load_gradient(gradient_dir, model, expected={"arch": meta.arch, "num_classes": meta.num_classes,
                                                           "input_shape": meta.input_shape})
    return recover_labels(config, model, artifact, out_dir)
