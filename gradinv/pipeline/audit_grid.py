"""The defense audit's grid: every defense at every strength params.yaml's `audit` section asks
for, validated (config.py checks it before any work starts, without loading the audit's plots)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradinv.client.defenses import QUANTIZE, validate
from gradinv.errors import UserError

if TYPE_CHECKING:  # the config module validates through audit_points
    from gradinv.pipeline.config import AuditConfig


def audit_points(config: AuditConfig) -> list[dict]:
    """[{"defense", "strength", "defenses", "aggregation_clients"}] for every grid point, the
    undefended point first. Strength is σ for noise (after clipping to clip_norm), the kept
    fraction for top-k, the client count for secure aggregation, the local epochs for FedAvg,
    the format for quantization, the target ε for DP-SGD (inf: clipping without noise)."""
    points = [{"defense": "none", "strength": None, "defenses": [], "aggregation_clients": 1}]
    for sigma in _numbers(config.noise_sigmas, "audit.noise_sigmas", lambda v: v >= 0):
        points.append({"defense": "clip+gaussian", "strength": sigma, "aggregation_clients": 1,
                       "defenses": [{"kind": "clip", "norm": config.clip_norm}, {"kind": "gaussian", "sigma": sigma}]})
    for keep in _numbers(config.topk_keep, "audit.topk_keep", lambda v: 0 < v <= 1):
        points.append({"defense": "topk", "strength": keep, "aggregation_clients": 1,
                       "defenses": [{"kind": "topk", "keep": keep}]})
    for clients in _numbers(config.aggregation_clients, "audit.aggregation_clients", lambda v: v >= 1 and v == int(v)):
        points.append({"defense": "secure_aggregation", "strength": int(clients), "defenses": [],
                       "aggregation_clients": int(clients)})
    for steps in _numbers(config.fedavg_steps, "audit.fedavg_steps", lambda v: v >= 1 and v == int(v)):
        points.append({"defense": "fedavg", "strength": int(steps), "aggregation_clients": 1,
                       "defenses": [{"kind": "fedavg", "steps": int(steps), "lr": config.fedavg_lr,
                                     "batch_size": config.fedavg_batch_size}]})
    for target in config.dp_epsilons:
        if not (target == "inf" or isinstance(target, (int, float)) and not isinstance(target, bool) and target > 0):
            raise UserError(f"params: 'audit.dp_epsilons' entries must be positive numbers or inf, got {target!r}.")
        dp_sgd = {"kind": "dp_sgd", "max_grad_norm": config.dp_max_grad_norm, "sample_rate": config.dp_sample_rate,
                  "steps": config.dp_steps, "delta": config.dp_delta}
        dp_sgd |= {"noise_multiplier": 0.0} if target == "inf" else {"epsilon": float(target)}
        points.append({"defense": "dp_sgd", "strength": target, "aggregation_clients": 1, "defenses": [dp_sgd]})
    for to in config.quantize:
        if to not in QUANTIZE:
            raise UserError(f"params: 'audit.quantize' entries must be among {', '.join(QUANTIZE)}, got {to!r}.")
        points.append({"defense": "quantize", "strength": to, "aggregation_clients": 1,
                       "defenses": [{"kind": "quantize", "to": to}]})
    for point in points:
        point["defenses"] = validate(point["defenses"])
    return points


def _numbers(values: list, key: str, ok) -> list:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in values):
        raise UserError(f"params: '{key}' has a value out of range: {values!r}.")
    return list(values)
