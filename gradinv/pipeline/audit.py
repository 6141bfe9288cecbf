"""The defense audit: each defense swept over a strength grid, the same attack budget against
every defended gradient, and leakage (PSNR, SSIM, IIP, label accuracy) set against a utility
proxy (how close the defended gradient stays to the clean one)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gradinv.client.defenses import QUANTIZE, validate
from gradinv.errors import UserError

if TYPE_CHECKING:  # the config module validates through audit_points
    from gradinv.pipeline.config import AuditConfig

AUDIT = "data/audit"
LEAKAGE = ("psnr", "ssim", "iip", "label_accuracy")


def audit_points(config: AuditConfig) -> list[dict]:
    """[{"defense", "strength", "defenses", "aggregation_clients"}] for every grid point, the
    undefended point first. Strength is σ for noise (after clipping to clip_norm), the kept
    fraction for top-k, the client count for secure aggregation, the local epochs for FedAvg,
    the format for quantization."""
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


def utility(defended: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine similarity and relative L2 error of the defended gradient (a FedAvg update read as
    its mean gradient) against the clean one."""
    d = torch.cat([defended[n].flatten() for n in clean]).double()  # float32 sums over millions drift
    c = torch.cat([clean[n].flatten() for n in clean]).double()
    return {"utility_cosine": float(torch.nn.functional.cosine_similarity(d, c, dim=0)),
            "utility_relative_error": float(torch.linalg.vector_norm(d - c) / torch.linalg.vector_norm(c))}


def save_defense_plot(rows: list[dict], defense: str, path: str | Path) -> Path:
    """Leakage against strength for one defense, the undefended level as a dashed line."""
    from gradinv.evaluation.report import _pyplot, _save_figure

    plt = _pyplot()
    mine = [r for r in rows if r["defense"] == defense]
    baseline = next(r for r in rows if r["defense"] == "none")
    numeric = all(isinstance(r["strength"], (int, float)) for r in mine)
    positions = list(range(len(mine)))
    figure, axes = plt.subplots(1, len(LEAKAGE) + 1, figsize=(3.3 * (len(LEAKAGE) + 1), 3))
    for axis, key in zip(axes, (*LEAKAGE, "utility_cosine")):
        axis.plot(positions, [r[key] for r in mine], marker="o")
        if key in baseline and baseline[key] is not None:
            axis.axhline(baseline[key], linestyle="--", color="grey", label="undefended")
        axis.set_xticks(positions, [f"{r['strength']:g}" if numeric else str(r["strength"]) for r in mine], fontsize=8)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel(_strength_name(defense), fontsize=8)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"leakage against {defense} strength", fontsize=10)
    figure.tight_layout()
    return _save_figure(figure, path)


def _strength_name(defense: str) -> str:
    return {"clip+gaussian": "σ (noise std / C)", "topk": "fraction kept", "secure_aggregation": "clients K",
            "fedavg": "local epochs E", "quantize": "format"}.get(defense, "strength")
