"""DP-SGD for the client's step, through Opacus: per-sample gradients (expanded weights), each
clipped to L2 norm C, summed, Gaussian noise of standard deviation σ·C added, divided by the
batch size (DPOptimizer); and the (ε, δ) that Opacus's accountant gives for σ, the Poisson
sampling rate q and the number of steps the client takes."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from gradinv.errors import UserError

ACCOUNTANTS = ("prv", "rdp")
DEFAULTS = {"steps": 1, "delta": 1e-5, "accountant": "prv", "local_steps": 1}
BATCH_COUPLED = ("{kind} clips each sample's gradient, but this model's BatchNorm layers (train mode) couple the "
                 "samples through the batch statistics, so no per-sample gradient exists and the DP guarantee does "
                 "not hold: train the victim with 'victim.norm: group'{opt_in}.")


def _opacus():
    try:
        import opacus
    except ImportError:
        raise UserError("the dp_sgd defense needs Opacus: install gradinv's 'privacy' extra "
                        "(pip install -e '.[privacy]'); `make env` does.") from None
    return opacus


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def refuse_batch_coupled(model: nn.Module, kind: str, opt_in: str = "") -> None:
    """One sentence, before any work, for per-sample clipping on a BatchNorm model."""
    if has_batch_norm(model):
        raise UserError(BATCH_COUPLED.format(kind=kind, opt_in=opt_in))


@lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε spent by `steps` DP-SGD steps of noise multiplier σ at sampling rate q (∞ without noise)."""
    if noise_multiplier == 0:
        return math.inf
    accounts = _opacus().accountants.create_accountant(mechanism=accountant)
    accounts.history = [(noise_multiplier, sample_rate, steps)]
    return float(accounts.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """The smallest σ (to Opacus's tolerance) whose ε does not exceed the target; 0 for ε = ∞."""
    if math.isinf(target_epsilon):
        return 0.0
    _opacus()  # the one sentence when Opacus is missing, before importing from it
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))
    except ValueError as err:
        raise UserError(f"no noise multiplier reaches ε {target_epsilon:g} at δ {delta:g} ({err}).") from None


def resolve(entry: dict, name: str) -> dict:
    """A dp_sgd defense with σ and ε both filled in: σ from a target ε, or ε from the given σ.
    An entry that has both (as an artifact's metadata records it) is checked, not recomputed."""
    spec = {**DEFAULTS, **entry}
    recorded = "noise_multiplier" in entry and "epsilon" in entry and "steps" in entry
    if not recorded and ("noise_multiplier" in entry) == ("epsilon" in entry):
        raise UserError(f"params: {name} (dp_sgd) takes exactly one of 'noise_multiplier' and 'epsilon'.")
    for key, low in (("max_grad_norm", 0), ("sample_rate", 0), ("delta", 0)):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
            raise UserError(f"params: {name} dp_sgd '{key}' must be a positive number, got {value!r}.")
    if not spec["sample_rate"] <= 1 or not spec["delta"] < 1:
        raise UserError(f"params: {name} dp_sgd 'sample_rate' must be at most 1 and 'delta' below 1.")
    if isinstance(spec["steps"], bool) or not isinstance(spec["steps"], int) or spec["steps"] < 1:
        raise UserError(f"params: {name} dp_sgd 'steps' must be a positive whole number, got {spec['steps']!r}.")
    if isinstance(spec["local_steps"], bool) or not isinstance(spec["local_steps"], int) or spec["local_steps"] < 1:
        raise UserError(f"params: {name} dp_sgd 'local_steps' must be a positive whole number, got {spec['local_steps']!r}.")
    lr = spec.get("lr")
    if spec["local_steps"] > 1 and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                                    or not math.isfinite(lr) or lr <= 0):
        raise UserError(f"params: {name} dp_sgd with local_steps {spec['local_steps']} shares an update, so it needs "
                        f"a positive learning rate 'lr', got {lr!r}.")
    if spec["accountant"] not in ACCOUNTANTS:
        raise UserError(f"params: {name} dp_sgd 'accountant' must be one of {', '.join(ACCOUNTANTS)}.")
    budget = (spec["sample_rate"], spec["steps"], spec["delta"], spec["accountant"])
    if recorded:
        return spec
    if "epsilon" in entry:
        target = entry["epsilon"]
        if isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target) or target <= 0:
            raise UserError(f"params: {name} dp_sgd 'epsilon' must be a positive number or .inf, got {target!r}.")
        spec["noise_multiplier"] = noise_for(float(target), *budget)
        spec["epsilon_target"] = float(target)
    sigma = spec["noise_multiplier"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise UserError(f"params: {name} dp_sgd 'noise_multiplier' must be a non-negative number, got {sigma!r}.")
    spent = epsilon(float(sigma), *budget)
    spec["epsilon"] = None if math.isinf(spent) else spent  # None: no noise, no guarantee
    return spec


def dp_sgd_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise_multiplier: float,
                  max_grad_norm: float, local_steps: int, lr: float,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The weight update (new − old) of `local_steps` DP-SGD steps of plain SGD at rate `lr`, each
    over the whole batch (the model in train mode, no BatchNorm; it is left as it was)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    try:
        for _ in range(local_steps):
            step = dp_sgd_gradient(model, images, labels, noise_multiplier, max_grad_norm, generator)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in step:
                        p -= lr * step[name]
        return {name: p.detach() - before[name] for name, p in model.named_parameters() if name in before}
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in before:
                    p.copy_(before[name])


def dp_sgd_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise_multiplier: float,
                    max_grad_norm: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The noisy clipped mean gradient of one DP-SGD step on the batch, as Opacus computes it
    (the model in train mode, no BatchNorm; its parameters are left unchanged)."""
    refuse_batch_coupled(model, "dp_sgd")
    opacus = _opacus()
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    # Expanded weights rather than hooks: a hooked layer's output may not be changed in place,
    # and torchvision's residual blocks add to theirs (`out += identity`).
    wrapped = opacus.grad_sample.GradSampleModuleExpandedWeights(model, loss_reduction="mean", batch_first=True)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=noise_multiplier,
                            max_grad_norm=max_grad_norm, expected_batch_size=len(labels), loss_reduction="mean",
                            generator=generator)
    try:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(images), labels).backward()
        optimizer.pre_step()
        return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    finally:
        optimizer.zero_grad(set_to_none=True)
