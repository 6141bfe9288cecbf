"""Pictures and the self-contained HTML report of one run (no server, images inline)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch

from gradinv.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return Path(path)


def save_comparison(rows: dict[str, torch.Tensor], row_psnr: dict[str, torch.Tensor], path: str | Path) -> Path:
    """One row per entry of (B, 3, H, W) images in [0, 1]; each reconstruction titled with its PSNR."""
    plt = _pyplot()
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
    return _save_figure(figure, path)


def save_sweep_plot(table: dict[str, list], path: str | Path) -> Path:
    """PSNR, IIP and label accuracy (mean ± std over batches) against batch size."""
    plt = _pyplot()
    panels = (("psnr", "PSNR (dB), chosen seed"), ("iip", "IIP"), ("label_accuracy", "label accuracy"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    sizes = table["batch_size"]
    for axis, (key, title) in zip(axes, panels):
        means = [float("nan") if v is None else v for v in table[f"{key}_mean"]]
        stds = [0.0 if v is None else v for v in table[f"{key}_std"]]
        axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("batch size")
        axis.set_title(title, fontsize=10)
        if key != "psnr":
            axis.set_ylim(-0.05, 1.05)
    figure.tight_layout()
    return _save_figure(figure, path)


def loss_curve_png(loss_rows: list[dict]) -> bytes:
    """Total and gradient-matching loss per seed against iteration (log scale), as PNG bytes."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for seed in sorted({row["seed"] for row in loss_rows}):
        mine = [row for row in loss_rows if row["seed"] == seed]
        for axis, term in zip(axes, ("total", "grad")):
            axis.plot([row["iteration"] for row in mine], [row[term] for row in mine], label=f"seed {seed}")
    for axis, term in zip(axes, ("total objective", "gradient distance (unweighted)")):
        axis.set_yscale("log"), axis.set_xlabel("iteration"), axis.set_title(term), axis.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("—" if value is None else str(value))


def _table(columns: dict[str, list]) -> str:
    names = list(columns)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{_cell(columns[n][i])}</td>" for n in names) + "</tr>"
                   for i in range(len(columns[names[0]])))
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str | Path, summary: dict, per_image: dict[str, list], grid_png: str | Path,
               loss_rows: list[dict]) -> Path:
    headline = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    consensus = summary.get("consensus", {})
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gradinv report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}} th{{background:#f3f3f3}} img{{max-width:100%}}</style>
</head><body>
<h1>gradinv: what the shared gradient gave away</h1>
<h2>Summary</h2>
{_table({"metric": list(headline), "value": list(headline.values())})}
<h2>Consensus of the seeds</h2>
{_table({"metric": list(consensus), "value": list(consensus.values())})}
<h2>Originals and reconstructions (matched)</h2>
{_img(Path(grid_png).read_bytes(), "originals, chosen seed and consensus")}
<h2>Per image (chosen seed)</h2>
{_table(per_image)}
<h2>Loss curves</h2>
{_img(loss_curve_png(loss_rows), "loss curves")}
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return Path(path)


def write_audit_html(path: str | Path, table: dict[str, list], plots: list[str | Path]) -> Path:
    """The defense audit as one self-contained page: the table and each defense's plot."""
    figures = "\n".join(f"<h3>{html.escape(Path(p).stem)}</h3>{_img(Path(p).read_bytes(), Path(p).stem)}" for p in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gradinv defense audit</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}} th{{background:#f3f3f3}} img{{max-width:100%}}</style>
</head><body>
<h1>gradinv: leakage against defense strength</h1>
<p>Every point attacks the same client batch with the same budget and seeds. Utility: cosine and
relative error of the shared gradient against the clean one. labels_warned: label recovery said
a defense breaks one of its assumptions.</p>
<h2>Defenses</h2>
{_table({k: v for k, v in table.items() if k != "folder"})}
<h2>Leakage against strength</h2>
{figures}
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return Path(path)
