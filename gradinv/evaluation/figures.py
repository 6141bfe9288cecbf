"""The pictures of a run: comparison grid, sweep plot, loss curves and single image tiles."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from gradinv.io import atomic_path

TERM_NAMES = {"grad": "gradient distance", "bn": "BatchNorm prior", "tv": "total variation", "l2": "image norm",
              "group": "group consistency"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(figure)
    return Path(path)


def figure_png(figure, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def image_png(image: torch.Tensor) -> bytes:
    """One (3, H, W) image in [0, 1] as PNG bytes, at its own resolution."""
    from torchvision.io import encode_png

    return bytes(encode_png((image.clamp(0, 1) * 255).round().to(torch.uint8)).numpy())


def save_comparison(rows: dict[str, torch.Tensor], row_psnr: dict[str, torch.Tensor], path: str | Path) -> Path:
    """One row per entry of (B, 3, H, W) images in [0, 1]; each reconstruction titled with its PSNR."""
    plt = pyplot()
    batch = len(next(iter(rows.values())))
    figure, axes = plt.subplots(len(rows), batch, figsize=(1.3 * batch, 1.45 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for i in range(batch):
            axis = axes[r][i]
            axis.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axis.set_xticks([]), axis.set_yticks([])
            if name in row_psnr:
                axis.set_title(f"{row_psnr[name][i]:.1f} dB", fontsize=8)
            if i == 0:
                axis.set_ylabel(name, fontsize=9)
    return save_figure(figure, path)


def save_sweep_plot(table: dict[str, list], path: str | Path) -> Path:
    """PSNR, IIP and label accuracy (mean ± std over batches) against batch size; beside PSNR,
    the gradient-only attack's where the sweep ran it."""
    plt = pyplot()
    panels = (("psnr", "PSNR of the chosen seed (dB)"), ("iip", "IIP (share of images)"),
              ("label_accuracy", "label accuracy (share)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    sizes = table["batch_size"]
    alone = any(v is not None for v in table.get("gradient_only_psnr_mean", []))
    for axis, (key, title) in zip(axes, panels):
        series = [(key, "with the BN statistics" if alone else None)]
        if key == "psnr" and alone:
            series.append(("gradient_only_psnr", "from the gradient alone"))
        for column, label in series:
            means = [float("nan") if v is None else v for v in table[f"{column}_mean"]]
            stds = [0.0 if v is None else v for v in table[f"{column}_std"]]
            axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=label)
        if len(series) > 1:
            axis.legend(fontsize=7)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("batch size")
        axis.set_title(title, fontsize=10)
        if key != "psnr":
            axis.set_ylim(-0.05, 1.05)
    figure.tight_layout()
    return save_figure(figure, path)


def loss_curve_png(loss_rows: list[dict], shares: list[dict[str, float]]) -> bytes:
    """Three panels against iteration: the total objective and the unweighted gradient distance
    per seed (log scale), and each weighted term's share of the objective (mean over seeds)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.3))
    for seed in sorted({row["seed"] for row in loss_rows}):
        mine = [row for row in loss_rows if row["seed"] == seed]
        for axis, term in zip(axes, ("total", "grad")):
            axis.plot([row["iteration"] for row in mine], [row[term] for row in mine], label=f"seed {seed}")
    for axis, title in zip(axes, ("total objective", "gradient distance (unweighted)")):
        axis.set_yscale("log"), axis.set_xlabel("iteration"), axis.set_title(title, fontsize=10), axis.legend(fontsize=7)
    iterations = sorted({row["iteration"] for row in loss_rows})
    for term, name in TERM_NAMES.items():
        axes[2].plot(iterations, [100 * share[term] for share in shares], label=name)
    axes[2].set_ylim(0, 100), axes[2].set_xlabel("iteration")
    axes[2].set_title("share of the objective (%), mean over seeds", fontsize=10), axes[2].legend(fontsize=7)
    figure.tight_layout()
    return figure_png(figure)
