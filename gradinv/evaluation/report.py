"""The self-contained HTML pages (no server, images inline): a run's report, which opens with
what leaked and the run's context, and the defense audit's page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import torch

from gradinv.evaluation.context import RunContext
from gradinv.evaluation.figures import TERM_NAMES, image_png, loss_curve_png
from gradinv.evaluation.glossary import METRICS, heading, verdict
from gradinv.io import atomic_path

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.verdict{font-size:1.15em;background:#fff6e0;border-left:5px solid #e0a000;padding:.6em 1em}
.figures{font-size:1.05em} .scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:.25em .6em}
td.number{text-align:right} th{background:#f3f3f3;text-align:left} th[title]{cursor:help;text-decoration:underline dotted}
.context td:first-child{font-weight:600;white-space:nowrap} .context td{text-align:left}
.tiles{display:flex;flex-wrap:wrap;gap:.8em} figure{margin:0;width:96px;text-align:center;font-size:.8em;overflow-wrap:anywhere}
figure img{display:block;width:96px;height:96px;image-rendering:pixelated;margin-bottom:2px}
img.plot{max-width:100%} .caption{color:#444;max-width:60em} dt{font-weight:600} dd{margin:0 0 .4em 1.5em}
@media print{body{max-width:none;margin:0} .scroll{overflow:visible} figure,img,table{break-inside:avoid}}"""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _write(path: str | Path, page: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)


def _img(png: bytes, alt: str, css_class: str = "plot") -> str:
    return (f'<img class="{css_class}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("—" if value is None else str(value))


def _table(columns: dict[str, list], css_class: str = "") -> str:
    """A table inside a box that scrolls sideways where it is wider than the page; headings of
    known metrics carry their unit and, on hover, their definition."""
    names = list(columns)
    head = "".join(f'<th title="{html.escape(METRICS[n].definition)}">{html.escape(heading(n))}</th>'
                   if n in METRICS else f"<th>{html.escape(heading(n))}</th>" for n in names)
    body = "".join("<tr>" + "".join(
        f'<td class="number">{_cell(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{_cell(v)}</td>" for v in (columns[n][i] for n in names)) + "</tr>"
        for i in range(len(columns[names[0]])))
    return f'<div class="scroll"><table class="{css_class}"><tr>{head}</tr>{body}</table></div>'


def _headline(summary: dict, batch: int, defenses: str) -> str:
    hits = round((summary["iip"] or 0) * batch)
    labels = round(summary["label_accuracy"] * batch)
    facts = [f"{labels} of {batch} labels recovered", f"{hits} of {batch} images recognisable (IIP)",
             f"PSNR {summary['psnr']:.1f} dB, {summary['psnr_gain_over_noise']:+.1f} dB over the starting noise",
             f"SSIM {summary['ssim']:.2f}", f"defenses: {defenses}"]
    said = verdict(summary["label_accuracy"], summary["iip"], summary["psnr_gain_over_noise"])
    return (f'<p class="verdict"><strong>{html.escape(said)}</strong><br>'
            f'<span class="figures">{html.escape(" · ".join(facts))}</span></p>')


def _tiles(rows: dict[str, torch.Tensor], class_names: list[str], true_labels: list[int], psnr: list[float],
           hits: list[bool]) -> str:
    """A column per original: the original above each matched reconstruction."""
    figures = []
    for i, label in enumerate(true_labels):
        images = "".join(_img(image_png(images[i]), f"{name}, image {i}", "tile") for name, images in rows.items())
        mark = ", recognised" if hits[i] else ""
        figures.append(f"<figure>{images}<figcaption>{html.escape(class_names[label])}<br>"
                       f"{psnr[i]:.1f} dB{mark}</figcaption></figure>")
    return f'<p class="caption">Rows: {html.escape(", ".join(rows))}.</p><div class="tiles">{"".join(figures)}</div>'


def _loss_caption(shares: list[dict[str, float]]) -> str:
    last = shares[-1]
    order = sorted(last, key=last.get, reverse=True)
    parts = ", ".join(f"{TERM_NAMES[t]} {100 * last[t]:.0f} %" for t in order if last[t] >= 0.005)
    lead = order[0]
    note = ("" if lead == "grad" else f" The {TERM_NAMES[lead]} dominates: it shapes the images more than the "
            "gradient does, and the gradient distance may rise while the total falls without the attack failing.")
    return f"At the last iteration, the weighted terms' shares of the objective (mean over seeds): {parts}.{note}"


def _mean_shares(loss_rows: list[dict]) -> list[dict[str, float]]:
    """Per logged iteration, each term's weighted share (the loss table's share_<term>) averaged
    over the seeds."""
    by_iteration: dict[int, list[dict]] = {}
    for row in loss_rows:
        by_iteration.setdefault(row["iteration"], []).append({t: row[f"share_{t}"] for t in TERM_NAMES})
    return [{t: sum(s[t] for s in seeds) / len(seeds) for t in TERM_NAMES}
            for _, seeds in sorted(by_iteration.items())]


CHOICE = {"objective": "has the lowest final objective",
          "gradient": "has the lowest final gradient distance",
          "consensus": "is the one nearest the registered consensus"}


def _relative(summary: dict) -> str:
    """The final gradient distance against the target's own size (an all-zero gradient's distance)."""
    relative = summary.get("final_grad_relative")
    if relative is None:
        return "not known"
    return (f"{100 * relative:.0f} % of an all-zero gradient's distance (100 % would mean the reconstruction's "
            "gradient matches the shared one no better than no gradient at all)")


def _glossary() -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(m.heading())}</dt><dd>{html.escape(m.definition)}</dd>"
                            for m in METRICS.values()) + "</dl>"


def write_html(path: str | Path, summary: dict, per_image: dict[str, list], tiles: dict[str, torch.Tensor],
               loss_rows: list[dict], inversion: dict, context: RunContext) -> Path:
    """report.html: what leaked, the run's context, the images with their class names, every
    figure with its unit, the loss curves with what drives them, and a glossary."""
    batch = len(per_image["true_label"])
    consensus = summary["consensus"]
    keys = [k for k in ("psnr", "ssim", "registered_psnr", "lpips", "fft2d", "iip") if summary.get(k) is not None]
    figures = {"metric": [heading(k) for k in keys], "chosen seed": [summary[k] for k in keys],
               "consensus": [consensus.get(k) for k in keys], "definition": [METRICS[k].definition for k in keys]}
    per_image_table = {"image": per_image["original_index"],
                       "class": [context.class_names[c] for c in per_image["true_label"]],
                       **{k: per_image[k] for k in ("psnr", "ssim", "registered_psnr", "lpips", "iip_hit",
                                                    "consensus_psnr")}}
    shares = _mean_shares(loss_rows)
    seeds = ", ".join(f"{v:.1f}" for v in summary["per_seed"]["psnr"])
    body = f"""<h1>gradinv: what the shared gradient gave away</h1>
{_headline(summary, batch, context.defenses)}
<h2>Run</h2>
{_table({"what": [r[0] for r in context.rows], "value": [r[1] for r in context.rows]}, "context")}
<h2>Originals and reconstructions</h2>
{_tiles(tiles, context.class_names, per_image["true_label"], per_image["psnr"], per_image["iip_hit"])}
<h2>Figures</h2>
<p class="caption">Means over the batch. Starting noise: {summary['psnr_initial_noise']:.2f} dB; label accuracy
{summary['label_accuracy']:.0%}; the chosen seed ({summary['chosen_seed']}) {CHOICE[inversion.get('choose', 'gradient')]};
its final gradient distance is {_relative(summary)};
PSNR per seed: {seeds} dB.</p>
{_table(figures)}
<h2>Per image (chosen seed)</h2>
{_table(per_image_table)}
<h2>Loss curves</h2>
{_img(loss_curve_png(loss_rows, shares), "loss curves")}
<p class="caption">{html.escape(_loss_caption(shares))}</p>
<h2>Glossary</h2>
{_glossary()}"""
    return _write(path, _page("gradinv report", body))


def write_audit_html(path: str | Path, table: dict[str, list], plots: list[str | Path], findings: list[str]) -> Path:
    """The defense audit as one self-contained page: what each defense did, the table, and
    each defense's plot."""
    figures = "\n".join(f"<h3>{html.escape(Path(p).stem)}</h3>{_img(Path(p).read_bytes(), Path(p).stem)}" for p in plots)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in findings)
    body = f"""<h1>gradinv: leakage against defense strength</h1>
<div class="verdict"><strong>What each defense did</strong><ul>{items}</ul></div>
<p class="caption">Every point attacks the same client batch with the same budget and seeds. The gradient
cosine and relative error compare the shared gradient with the clean one (the training signal a
defense keeps). labels_warned: label recovery said a defense breaks one of its assumptions.
Where the batch's BatchNorm statistics leaked, the gradient_only columns are the same attack on the
same gradient without them: what the gradient alone gives away, the leak a gradient defense acts on.</p>
<h2>Defenses</h2>
{_table({k: v for k, v in table.items() if k != "folder"})}
<h2>Leakage against strength</h2>
{figures}
<h2>Glossary</h2>
{_glossary()}"""
    return _write(path, _page("gradinv defense audit", body))


def write_federation_html(path: str | Path, table: dict[str, list], plot: str | Path, findings: list[str]) -> Path:
    """The Flower federation audit as one self-contained page: what the replies gave away, the
    table of attacked replies, and leakage against round and client."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in findings)
    body = f"""<h1>gradinv: what the server of a Flower federation could reconstruct</h1>
<div class="verdict"><strong>What the replies gave away</strong><ul>{items}</ul></div>
<p class="caption">Each row attacks one client's reply as the server received it: its update against the
round's global model, replayed through the client's declared local training (E epochs, learning rate,
batch size), scored against the client's own examples. bn_statistics: what its BatchNorm buffers gave
away (exact after one local step, a momentum-weighted average after more; not sent: the attack
matches the global model's running statistics instead).</p>
<h2>Replies</h2>
{_table({k: v for k, v in table.items() if k != "folder"})}
<h2>Leakage against round and client</h2>
{_img(Path(plot).read_bytes(), Path(plot).stem)}
<h2>Glossary</h2>
{_glossary()}"""
    return _write(path, _page("gradinv federation audit", body))
