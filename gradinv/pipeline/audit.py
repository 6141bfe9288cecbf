"""The defense audit: each defense swept over a strength grid, the same attack budget against
every defended gradient, and leakage (PSNR, SSIM, IIP, label accuracy) set against a utility
proxy (how close the defended gradient stays to the clean one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gradinv.pipeline.audit_grid import audit_points

if TYPE_CHECKING:  # the config module validates through audit_points
    from gradinv.pipeline.config import InversionConfig

__all__ = ["AUDIT", "GRADIENT_ONLY_LEAKAGE", "LEAKAGE", "at_budget", "audit_points", "defense_findings",
           "save_defense_plot", "utility"]

AUDIT = "data/audit"
LEAKAGE = ("psnr", "ssim", "iip", "label_accuracy")
# The same attack without the BN statistics, where they leaked (evaluation.gradient_only); None elsewhere.
GRADIENT_ONLY_LEAKAGE = ("gradient_only_psnr", "gradient_only_ssim", "gradient_only_iip")
PANELS = (*LEAKAGE, "gradient_only_psnr", "utility_cosine")


def at_budget(inversion: InversionConfig, iterations: int, seeds: int) -> InversionConfig:
    """The same attack at the audit's budget: the group pull starts at the same share of the iterations."""
    return dataclasses.replace(inversion, iterations=iterations, seeds=seeds,
                               group_start=inversion.group_start * iterations // inversion.iterations)


def utility(defended: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine similarity and relative L2 error of the defended gradient (a FedAvg update read as
    its mean gradient) against the clean one."""
    d = torch.cat([defended[n].flatten() for n in clean]).double()  # float32 sums over millions drift
    c = torch.cat([clean[n].flatten() for n in clean]).double()
    return {"utility_cosine": float(torch.nn.functional.cosine_similarity(d, c, dim=0)),
            "utility_relative_error": float(torch.linalg.vector_norm(d - c) / torch.linalg.vector_norm(c))}


def _varies(values: list) -> bool:
    known = [v for v in values if v is not None]
    return bool(known) and max(known) - min(known) > 1e-9


def shown_panels(rows: list[dict], defense: str) -> list[str]:
    """The figures that vary over the defense's points and the undefended one (PSNR at least)."""
    baseline = next(r for r in rows if r["defense"] == "none")
    mine = [r for r in rows if r["defense"] == defense]
    return [k for k in _panels(rows) if _varies([r.get(k) for r in mine] + [baseline.get(k)])] or ["psnr"]


def _panels(rows: list[dict]) -> tuple[str, ...]:
    """PANELS, less the gradient-only PSNR where it is the attack's own (no BN statistics leaked)."""
    alone_is_the_attack = all(r.get("gradient_only_psnr") in (None, r["psnr"]) for r in rows)
    return tuple(k for k in PANELS if not (k == "gradient_only_psnr" and alone_is_the_attack))


def save_defense_plot(rows: list[dict], defense: str, path: str | Path) -> Path:
    """Leakage against strength for one defense: a panel per figure that varies, the undefended
    level dashed and, for PSNR, the starting noise's level dotted, so that the axis shows how far
    a defense pushed PSNR towards noise."""
    from gradinv.evaluation.figures import pyplot, save_figure
    from gradinv.evaluation.glossary import heading

    plt = pyplot()
    mine = [r for r in rows if r["defense"] == defense]
    baseline = next(r for r in rows if r["defense"] == "none")
    numeric = all(isinstance(r["strength"], (int, float)) for r in mine)
    positions = list(range(len(mine)))
    shown = shown_panels(rows, defense)
    constant = [f"{heading(k)} {mine[0][k]:.3g}" for k in _panels(rows) if k not in shown and mine[0].get(k) is not None]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.1), squeeze=False)
    for axis, key in zip(axes[0], shown):
        values = [r[key] for r in mine]
        axis.plot(positions, values, marker="o", label=defense)
        if baseline.get(key) is not None:
            axis.axhline(baseline[key], linestyle="--", color="grey", label="undefended")
        if key == "psnr" and baseline.get("psnr_initial_noise") is not None:
            axis.axhline(baseline["psnr_initial_noise"], linestyle=":", color="tab:red", label="starting noise")
        if key in ("iip", "label_accuracy"):
            axis.set_ylim(-0.05, 1.05)
        axis.set_xticks(positions, [f"{r['strength']:g}" if numeric else str(r["strength"]) for r in mine], fontsize=8)
        axis.set_title(heading(key), fontsize=9)
        axis.set_xlabel(_strength_name(defense), fontsize=8)
    axes[0][0].legend(fontsize=7)
    title = f"leakage against {defense} strength" + (f" (unchanged: {', '.join(constant)})" if constant else "")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def defense_findings(rows: list[dict]) -> list[str]:
    """One sentence per defense: what its strongest setting did to leakage and to the gradient."""
    baseline = next(r for r in rows if r["defense"] == "none")
    lines = [f"Undefended: PSNR {baseline['psnr']:.1f} dB{_alone(baseline)} (starting noise "
             f"{baseline['psnr_initial_noise']:.1f} dB), labels {baseline['label_accuracy']:.0%}, IIP {baseline['iip']:.0%}."]
    for defense in dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none"):
        strongest = [r for r in rows if r["defense"] == defense][-1]
        lines.append(f"{defense}: at its strongest setting ({_strength_name(defense)} {strongest['strength']}), "
                     f"PSNR {strongest['psnr']:.1f} dB{_alone(strongest)}, labels {strongest['label_accuracy']:.0%}, "
                     f"IIP {strongest['iip']:.0%}, gradient cosine {strongest['utility_cosine']:.2f}.")
    return lines


def _alone(row: dict) -> str:
    """The gradient-only PSNR beside the PSNR, where the attack also ran without the BN statistics."""
    alone = row.get("gradient_only_psnr")
    return "" if alone is None else f" ({alone:.1f} dB from the gradient alone)"


def _strength_name(defense: str) -> str:
    return {"clip+gaussian": "σ (noise std / C)", "topk": "fraction kept", "secure_aggregation": "clients K",
            "fedavg": "local epochs E", "quantize": "format", "dp_sgd": "ε (DP-SGD)"}.get(defense, "strength")
