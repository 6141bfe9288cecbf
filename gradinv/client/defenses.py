"""Client-side defenses applied to the shared gradient at capture, in the order declared in
`capture.defenses`, and the checks that an artifact's tensors are what its declared defenses
produce.

Each defense is a mapping with a `kind`. Two decide what the client computes, and only one of
them may be given, first in the list:
- `fedavg`: `steps` (E) passes of plain SGD with learning rate `lr` (η) over the batch in
  consecutive mini-batches of `batch_size`; the weight update (new − old) is shared, not a gradient;
- `dp_sgd`: DP-SGD through Opacus (gradinv.client.dp): every sample's gradient clipped to
  `max_grad_norm` (C), Gaussian noise of std σC added to their sum, divided by the batch size;
  σ is `noise_multiplier`, or the smallest that keeps `epsilon` at `delta` (default 1e-5) for
  Poisson sampling rate `sample_rate` (q) over `steps` (default 1) steps, by `accountant` (prv,
  the default, or rdp); the resolved entry records σ and ε. With `local_steps` E > 1 and `lr` η,
  the update of E such steps (each over the batch) is shared. Needs a model without BatchNorm;
- `per_example_clip`: every sample's gradient clipped to L2 norm `norm` (C) before the mean, no
  noise (Opacus's per-sample gradients; on a BatchNorm model only with `batch_coupled: true`,
  through torch.func over the batch-coupled forward, which is not DP).
The others transform what is shared, in order:
- `clip`: scale the whole gradient to a global L2 norm of at most `norm` (C);
- `gaussian` / `laplace`: add N(0, (σC)²) or Laplace(0, σC) noise to every entry, with `sigma`
  (σ) and C the norm of the nearest clip or per-example clip before it (1 when there is none);
- `topk`: keep the `keep` fraction of each tensor's entries that are largest in magnitude, zero
  the rest (pruning / sparsification);
- `quantize`: `to` float16 | bfloat16 (rounded and returned as float32), int8 (symmetric, one
  scale per tensor) or sign (sign × mean magnitude, per tensor).
Every defense carries `known_to_attacker` (default true): what a defense-aware attack may use.
"""

from __future__ import annotations

import math

import torch

from gradinv.client import dp
from gradinv.errors import UserError

KINDS = ("fedavg", "dp_sgd", "per_example_clip", "clip", "gaussian", "laplace", "topk", "quantize")
COMPUTING = ("fedavg", "dp_sgd", "per_example_clip")
QUANTIZE = ("float16", "bfloat16", "int8", "sign")
_OPTIONAL = {"dp_sgd": {"noise_multiplier", "epsilon", "epsilon_target", "steps", "delta", "accountant", "local_steps",
                        "lr"},
             "per_example_clip": {"batch_coupled"}}
_FIELDS = {"fedavg": {"steps", "lr", "batch_size"}, "per_example_clip": {"norm"}, "clip": {"norm"},
           "dp_sgd": {"max_grad_norm", "sample_rate"},
           "gaussian": {"sigma"}, "laplace": {"sigma"}, "topk": {"keep"}, "quantize": {"to"}}


def validate(defenses: list, where: str = "capture.defenses") -> list[dict]:
    """The declared list with defaults filled in; one clear sentence for the first bad entry."""
    if not isinstance(defenses, list):
        raise UserError(f"params: '{where}' must be a list of defenses, got {defenses!r}.")
    checked = []
    for i, entry in enumerate(defenses):
        name = f"'{where}[{i}]'"
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise UserError(f"params: {name} must be a mapping whose kind is one of {', '.join(KINDS)}, got {entry!r}.")
        kind = entry["kind"]
        allowed = _FIELDS[kind] | _OPTIONAL.get(kind, set()) | {"kind", "known_to_attacker"}
        unknown = sorted(set(entry) - allowed)
        missing = sorted(_FIELDS[kind] - set(entry))
        if unknown or missing:
            what = f"has the unknown key '{unknown[0]}'" if unknown else f"lacks '{missing[0]}'"
            takes = ", ".join(sorted(_FIELDS[kind]) + [f"{k} (optional)" for k in sorted(_OPTIONAL.get(kind, ()))])
            raise UserError(f"params: {name} ({kind}) {what}; it takes {takes}.")
        if kind in COMPUTING and i > 0:
            raise UserError(f"params: {name} ({kind}) decides what the client computes, so it must come first in the list.")
        if kind == "dp_sgd":
            entry = dp.resolve(entry, name)
        if not isinstance(entry.get("batch_coupled", False), bool):
            raise UserError(f"params: {name} per_example_clip batch_coupled must be true or false.")
        value = entry[sorted(_FIELDS[kind])[0]] if kind != "fedavg" else entry["lr"]
        if kind == "fedavg":
            for key in ("steps", "batch_size"):
                if isinstance(entry[key], bool) or not isinstance(entry[key], int) or entry[key] < 1:
                    raise UserError(f"params: {name} fedavg '{key}' must be a positive whole number, got {entry[key]!r}.")
        if kind == "quantize":
            if value not in QUANTIZE:
                raise UserError(f"params: {name} quantize 'to' must be one of {', '.join(QUANTIZE)}, got {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"params: {name} ({kind}) needs a number, got {value!r}.")
        elif kind in ("clip", "per_example_clip", "fedavg", "dp_sgd") and value <= 0:
            raise UserError(f"params: {name} {kind} {'lr' if kind == 'fedavg' else 'norm'} must be positive, got {value!r}.")
        elif kind in ("gaussian", "laplace") and value < 0:
            raise UserError(f"params: {name} {kind} sigma must be non-negative, got {value!r}.")
        elif kind == "topk" and not 0 < value <= 1:
            raise UserError(f"params: {name} topk keep must be a fraction in (0, 1], got {value!r}.")
        known = entry.get("known_to_attacker", True)
        if not isinstance(known, bool):
            raise UserError(f"params: {name} known_to_attacker must be true or false, got {known!r}.")
        checked.append({**entry, "known_to_attacker": known})
    return checked


def global_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))


def clip(grads: dict[str, torch.Tensor], norm: float) -> dict[str, torch.Tensor]:
    scale = min(1.0, norm / max(global_norm(grads).item(), 1e-12))
    return {n: g * scale for n, g in grads.items()}


def add_noise(grads: dict[str, torch.Tensor], kind: str, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Gaussian noise of standard deviation `std`, or Laplace noise of scale `std`, on every entry."""
    noisy = {}
    for name, g in grads.items():
        if kind == "gaussian":
            noise = torch.randn(g.shape, generator=generator) * std
        else:  # Laplace(0, b) as the difference of two Exp(1/b) draws
            noise = (torch.empty(g.shape).exponential_(generator=generator) -
                     torch.empty(g.shape).exponential_(generator=generator)) * std
        noisy[name] = g + noise.to(g.device, g.dtype)
    return noisy


def kept_entries(numel: int, keep: float) -> int:
    return max(1, math.ceil(keep * numel))


def top_k(grads: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    sparse = {}
    for name, g in grads.items():
        flat = g.flatten()
        index = flat.abs().topk(kept_entries(flat.numel(), keep)).indices
        sparse[name] = torch.zeros_like(flat).index_copy_(0, index, flat[index]).view_as(g)
    return sparse


def quantize(grads: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, g in grads.items():
        if to in ("float16", "bfloat16"):
            out[name] = g.to(getattr(torch, to)).float()
        elif to == "int8":
            scale = g.abs().max().clamp_min(1e-30) / 127
            out[name] = (g / scale).round().clamp(-127, 127) * scale
        else:
            out[name] = g.sign() * g.abs().mean()
    return out


def apply(grads: dict[str, torch.Tensor], defenses: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The declared defenses, in order, on a gradient (a dict of tensors)."""
    clip_norm = 1.0
    for defense in defenses:
        kind = defense["kind"]
        if kind == "fedavg":
            continue  # computed by the client (gradinv.client.capture)
        if kind == "per_example_clip":
            clip_norm = defense["norm"]  # applied per sample by the client; the noise scales with it
        elif kind == "dp_sgd":
            clip_norm = defense["max_grad_norm"]  # clipped and noised by the client
        elif kind == "clip":
            clip_norm = defense["norm"]
            grads = clip(grads, clip_norm)
        elif kind in ("gaussian", "laplace"):
            grads = add_noise(grads, kind, defense["sigma"] * clip_norm, generator)
        elif kind == "topk":
            grads = top_k(grads, defense["keep"])
        else:
            grads = quantize(grads, defense["to"])
    return grads


def check_declared(grads: dict[str, torch.Tensor], defenses: list[dict], clients: int, where: str) -> None:
    """The tensors must be what the last declared defense leaves (earlier ones may be undone by
    later noise, so only the final state is checked). With secure aggregation over `clients`,
    a mean of that many pruned tensors has up to that many times the kept entries, and
    quantized values are no longer on one grid, so only pruning and clipping are checked."""
    if not defenses:
        return
    last = defenses[-1]
    if clients > 1 and last["kind"] == "quantize":
        return
    if last["kind"] == "per_example_clip":  # each sample's norm is bounded, so their mean's is too
        last = {"kind": "clip", "norm": last["norm"]}
    if last["kind"] == "dp_sgd" and last["noise_multiplier"] == 0 and last.get("local_steps", 1) == 1:
        last = {"kind": "clip", "norm": last["max_grad_norm"]}
    for name, g in grads.items():
        if last["kind"] == "topk":
            allowed = min(g.numel(), clients * kept_entries(g.numel(), last["keep"]))
            if int((g != 0).sum()) > allowed:
                raise UserError(f"{where} declares top-k pruning to {last['keep']:g}, but its entry '{name}' has "
                                f"{int((g != 0).sum())} non-zero values of {g.numel()} (at most {allowed} allowed).")
        elif last["kind"] == "quantize":
            to = last["to"]
            if to in ("float16", "bfloat16"):
                ok = torch.equal(g.to(getattr(torch, to)).float(), g)
            elif to == "int8":
                ok = g.unique().numel() <= 255
            else:
                ok = g.abs().unique().numel() <= 2
            if not ok:
                raise UserError(f"{where} declares quantization to {to}, but its entry '{name}' holds values that {to} cannot represent.")
    if last["kind"] == "clip" and global_norm(grads).item() > last["norm"] * (1 + 1e-4):
        raise UserError(f"{where} declares clipping to norm {last['norm']:g}, but its global norm is {global_norm(grads).item():.6g}.")


def transmitted_mask(target: dict[str, torch.Tensor], defenses: list[dict]) -> dict[str, torch.Tensor] | None:
    """For a gradient pruned by a top-k the attacker knows of (and nothing dense after it), the
    entries that were sent: a pruned-aware attack matches only those."""
    pruned = [i for i, d in enumerate(defenses) if d["kind"] == "topk" and d["known_to_attacker"]]
    if not pruned or any(d["kind"] in ("gaussian", "laplace") for d in defenses[pruned[-1] + 1:]):
        return None
    return {n: t != 0 for n, t in target.items()}


def shared_update(defenses: list[dict]) -> dict | None:
    """The FedAvg settings when the artifact holds a weight update rather than a gradient."""
    return next((d for d in defenses if d["kind"] == "fedavg"), None)


def private_update(defenses: list[dict]) -> dict | None:
    """The DP-SGD settings when the client shared the update of several local DP-SGD steps."""
    return next((d for d in defenses if d["kind"] == "dp_sgd" and d.get("local_steps", 1) > 1), None)


def as_gradient(shared: torch.Tensor, defenses: list[dict], batch_size: int) -> torch.Tensor:
    """What was shared, read as a gradient: a FedAvg update, or the update of several DP-SGD
    steps, is −lr × the sum of its local steps' gradients, so their mean gradient is
    −update / (lr × steps), exact for one step over the whole batch; anything else is a
    gradient already."""
    fedavg, dp_sgd = shared_update(defenses), private_update(defenses)
    if fedavg is not None:
        return -shared / (fedavg["lr"] * fedavg["steps"] * math.ceil(batch_size / fedavg["batch_size"]))
    if dp_sgd is not None:
        return -shared / (dp_sgd["lr"] * dp_sgd["local_steps"])
    return shared


def modelled_by_attack(defense: dict) -> bool:
    """Pruning (match only what was sent) and FedAvg (replay the local steps) change the attack;
    the attack needs no change for the others, or cannot model them (per-example clipping)."""
    return defense["known_to_attacker"] and defense["kind"] in ("topk", "fedavg")

