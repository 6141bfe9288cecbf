"""The defense audit: each defense swept over a strength grid, the same attack budget against
every defended gradient, and leakage (PSNR, SSIM, IIP, label accuracy) set against a utility
proxy (how close the defended gradient stays to the clean one)."""

from __future__ import annotations

from pathlib import Path

import torch

from gradinv.pipeline.audit_grid import audit_points

__all__ = ["AUDIT", "LEAKAGE", "audit_points", "save_defense_plot", "utility"]

AUDIT = "data/audit"
LEAKAGE = ("psnr", "ssim", "iip", "label_accuracy")


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
