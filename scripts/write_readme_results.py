"""Render the measured figures that README.md and docs/ show, from the result files in docs/results/.

    python scripts/write_readme_results.py           # rewrite every block below in place
    python scripts/write_readme_results.py --check   # exit 1 if a block differs from its render

Each block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` in its Markdown file:

    README.md          results-table   docs/results/default.json  (one `make run`)
    docs/batches.md    batches-table   docs/results/batches.json  (one `make batches`)
    docs/batches.md    sweep-table     docs/results/sweep.json    (one `make sweep`)
    docs/audit.md      audit-table     docs/results/audit.json    (one `make audit`)
    docs/audit.md      audit-dp-table  docs/results/audit_dp.json (one `make audit-dp`)
    docs/flower.md     federation-table docs/results/federation.json (one `make federation`)
    docs/tuning.md     seed-choice-table docs/results/seed_choice.json (benchmarks/seed_choice.py over
                                        many-batch runs)
    docs/tuning.md     seed-choice-tuning-table docs/results/seed_choice_tuning.json (the same over a
                                        tuning study's trials)

To show a new run: copy its figures into the JSON file (with the command, commit and machine),
then run this script. tests/test_readme.py checks that every block equals its render.
Standard library only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def _db(x: float) -> str:
    return f"{x:.2f} dB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + " %"


def _short(commit: str) -> str:
    return commit[:7]


def render_default(r: dict) -> str:
    """The README's table of one `make run` on the embedded default."""
    m, inv, vic, lab = r["metrics"], r["invert"], r["victim"], r["labels"]
    b = m["batch_size"]
    seeds, chosen = inv["seeds"], inv["chosen_seed"]
    cons, plain = m["consensus"], m["consensus_unregistered"]
    shift = m["registration_max_shift"]
    lpips = f"{m['lpips']:.3f}" if m["lpips"] is not None else m["lpips_status"]
    rows = [
        (f"label accuracy (`labels.strategy` {lab['strategy']})", f"{round(m['label_accuracy'] * b)} / {b}"),
        (f"mean matched PSNR, chosen seed (seed {chosen} of {seeds})", f"**{_db(m['psnr'])}**"),
        ("mean matched PSNR of the initial noise",
         f"{_db(m['psnr_initial_noise'])} (gain {m['psnr_gain_over_noise']:+.2f} dB)"),
        ("mean matched PSNR per seed", ", ".join(f"{p:.2f}" for p in m["per_seed"]["psnr"]) + " dB"),
        (f"SSIM / registered PSNR (±{shift} px) / FFT2D, chosen seed",
         f"{m['ssim']:.3f} / {_db(m['registered_psnr'])} / {m['fft2d']:.3f}"),
        (f"IIP, chosen seed (gallery: the {m['gallery_size']}-image pool)",
         f"{_pct(m['iip'])} ({round(m['iip'] * b)} of {b})"),
        (f"consensus, seeds registered ({inv['registration']}): PSNR / SSIM / IIP",
         f"**{_db(cons['psnr'])}** / {cons['ssim']:.3f} / {_pct(cons['iip'])}"),
        ("consensus without registration (plain pixel mean): PSNR / SSIM",
         f"{_db(plain['psnr'])} / {plain['ssim']:.3f}"),
        ("LPIPS", lpips),
        (f"victim ({vic['arch']}, {vic['epochs']} epochs) accuracy, train / pool",
         f"{_pct(vic['train_accuracy'])} / {_pct(vic['pool_accuracy'])}"),
        ("inversion", f"{inv['iterations']} iterations × {seeds} seeds in {inv['seconds']:.0f} s "
                      f"({inv['seconds_per_iteration']:.2f} s per iteration for all {seeds} seeds)"),
        ("whole pipeline, after set-up", f"{r['run_log']['pipeline_seconds'] / 60:.1f} minutes"),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {a} | {v} |" for a, v in rows), ""]
    lines.append(
        f"Against the chosen seed's PSNR: the registered consensus {cons['psnr'] - m['psnr']:+.2f} dB, "
        f"the plain pixel mean of the seeds {plain['psnr'] - m['psnr']:+.2f} dB.")
    lines.append("")
    lines.append(f"Command: `{r['command']}` with {r['params']}, at commit {_short(r['commit'])}, {r['date']}; "
                 f"machine: {r['machine']}. Figures: [docs/results/default.json](docs/results/default.json), "
                 "copied from the run's `data/eval/metrics.json`, `data/invert/invert.json`, "
                 "`data/victim/model.json` and `data/labels/labels.json`"
                 + (f"; {r['run_log']['note']}." if r["run_log"].get("note") else "."))
    return "\n".join(lines)


def _mean_std(x: dict, unit: str = "") -> str:
    return f"{x['mean']:.2f} ± {x['std']:.2f}{unit}"


def render_batches(r: dict) -> str:
    """docs/batches.md: the mean ± std over the batches of one `make batches`."""
    n = r["batches"] * r["batch_size"]
    iip = r["overall_iip"]
    rows = [
        ("PSNR, chosen seed", f"{_mean_std(r['psnr'], ' dB')} (per batch "
                              + ", ".join(f"{p:.2f}" for p in r["psnr"]["per_batch"]) + ")"),
        ("PSNR gain over the initial noise", f"{r['psnr_gain_over_noise']['mean']:+.2f} ± "
                                             f"{r['psnr_gain_over_noise']['std']:.2f} dB"),
        ("SSIM, chosen seed", f"{r['ssim']['mean']:.3f} ± {r['ssim']['std']:.3f}"),
        ("PSNR, registered consensus", _mean_std(r["consensus_psnr"], " dB")),
        (f"IIP over all {n} images, chosen seed / consensus", f"{_pct(iip['chosen_seed'])} / {_pct(iip['consensus'])}"),
        ("label accuracy over all images", _pct(r["overall_label_accuracy"])),
        *_gradient_only_rows(r),
        ("inversion time per attack, one worker (one torch thread)",
         f"{r['inversion_seconds_per_batch']['mean']} ± {r['inversion_seconds_per_batch']['std']} s"),
    ]
    lines = [f"| over {r['batches']} batches ({n} images) | mean ± std over batches |", "|---|---|",
             *(f"| {a} | {v} |" for a, v in rows), "",
             f"Command: `{r['command']}` ({r['params']}), {r['minutes_after_victim_trained']} minutes after the "
             f"victim was trained, at commit {_short(r['commit'])}; machine: {r['machine']}. Figures: "
             f"[results/batches.json](results/batches.json), {r['recorded_from']}."]
    return "\n".join(lines)


def _gradient_only_rows(r: dict) -> list[tuple[str, str]]:
    """The same batches attacked without their BN statistics (runs since evaluation.gradient_only)."""
    if "gradient_only_psnr" not in r:
        return []
    psnr, gain, ssim = r["gradient_only_psnr"], r["gradient_only_psnr_gain_over_noise"], r["gradient_only_ssim"]
    return [("PSNR from the gradient alone (the attack without the BN statistics)",
             f"{_mean_std(psnr, ' dB')} (per batch " + ", ".join(f"{p:.2f}" for p in psnr["per_batch"]) + ")"),
            ("its gain over the initial noise", f"{gain['mean']:+.2f} ± {gain['std']:.2f} dB"),
            ("SSIM from the gradient alone", f"{ssim['mean']:.3f} ± {ssim['std']:.3f}")]


def render_sweep(r: dict) -> str:
    """docs/batches.md: leakage against batch size from one `make sweep`."""
    lines = ["| batch size | PSNR, chosen seed | SSIM, chosen seed | PSNR, registered consensus | IIP | label accuracy "
             "| PSNR from the gradient alone |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        alone = _mean_std(row["gradient_only_psnr"], " dB") if row["gradient_only_psnr"] else "not run"
        lines.append(f"| {row['batch_size']} | {_mean_std(row['psnr'], ' dB')} | {row['ssim']['mean']:.3f} ± "
                     f"{row['ssim']['std']:.3f} | {_mean_std(row['consensus_psnr'], ' dB')} | {_pct(row['iip'])} | "
                     f"{_pct(row['label_accuracy'])} | {alone} |")
    lines += ["", f"Command: `{r['command']}` ({r['params']}), {r['minutes_after_victim_trained']} minutes after the "
                  f"victim was trained, at commit {_short(r['commit'])}; machine: {r['machine']}. Figures: "
                  f"[results/sweep.json](results/sweep.json), {r['recorded_from']}."]
    return "\n".join(lines)


AUDIT_STRENGTH = {"clip+gaussian": "σ", "topk": "keep", "secure_aggregation": "K", "fedavg": "E", "quantize": ""}


def render_audit(r: dict) -> str:
    """docs/audit.md: leakage and utility at every point of one `make audit`."""
    alone = any(row.get("gradient_only_psnr") is not None for row in r["rows"])  # runs since the two leaks apart
    lines = ["| defense | strength | attack | PSNR (dB) | SSIM | IIP | label acc. | consensus PSNR (dB) | "
             + ("PSNR, gradient alone (dB) | SSIM, gradient alone | IIP, gradient alone | " if alone else "")
             + "utility cos | utility rel. err |", "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if alone else "")]
    previous = None
    for row in r["rows"]:
        defense = row["defense"] if row["defense"] != previous else ""
        previous = row["defense"]
        strength = "–" if row["strength"] is None else f"{AUDIT_STRENGTH[row['defense']]} {row['strength']}".strip()
        both = (f"{row['gradient_only_psnr']:.2f} | {row['gradient_only_ssim']:.3f} | {row['gradient_only_iip']:.3g} | "
                if alone else "")
        lines.append(f"| {defense} | {strength} | {row['attack']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['iip']:.3g} | {row['label_accuracy']:.2f} | {row['consensus_psnr']:.2f} | {both}"
                     f"{row['utility_cosine']:.3f} | {row['utility_relative_error']:.4g} |")
    noise = r["rows"][0]["psnr_initial_noise"]
    lines += ["", f"The starting noise scores {noise:.2f} dB. Command: `{r['command']}` ({r['params']}), "
                  f"{r['minutes']} minutes, at commit {_short(r['commit'])}, {r['date']}; machine: {r['machine']}. "
                  "Figures: [results/audit.json](results/audit.json), the run's `data/audit/audit.json`"
                  + (f"; {r['note']}." if r.get("note") else ".")]
    return "\n".join(lines)


def render_audit_dp(r: dict) -> str:
    """docs/audit.md: leakage against ε from one `make audit-dp`."""
    lines = ["| target ε | σ | ε spent | PSNR (dB) | SSIM | IIP | label acc. | consensus PSNR (dB) | utility cos |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        target = "undefended" if row["defense"] == "none" else ("∞ (clipping only)" if row["strength"] == "inf"
                                                                 else f"{row['strength']:g}")
        sigma = "–" if row["sigma"] is None else f"{row['sigma']:.3f}"
        spent = "–" if row["defense"] == "none" else ("∞" if row["epsilon"] is None else f"{row['epsilon']:.2f}")
        lines.append(f"| {target} | {sigma} | {spent} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['iip']:.3g} | "
                     f"{row['label_accuracy']:.2f} | {row['consensus_psnr']:.2f} | {row['utility_cosine']:.3f} |")
    noise = r["rows"][0]["psnr_initial_noise"]
    lines += ["", f"The starting noise scores {noise:.2f} dB. Command: `{r['command']}` ({r['params']}), "
                  f"{r['minutes']} minutes including training the victim, at commit {_short(r['commit'])}, "
                  f"{r['date']}; machine: {r['machine']}. Figures: [results/audit_dp.json](results/audit_dp.json), "
                  "the run's `data/dp/data/audit/audit.json` and each point's `gradient.json`"
                  + (f"; {r['note']}." if r.get("note") else ".")]
    return "\n".join(lines)


def render_federation(r: dict) -> str:
    """docs/flower.md: every attacked reply of one `make federation` (BatchNorm buffers sent, the
    default), what the figures show, and the same replies' gain when the clients keep the buffers."""
    sent, kept = r["buffers_sent"], r["buffers_kept"]
    lines = ["| round | client | examples | local steps | BN statistics | PSNR (dB) | gain over noise (dB) | "
             "consensus PSNR (dB) | SSIM | IIP | label acc. |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sent["rows"]:
        lines.append(f"| {row['round']} | {row['client']} | {row['examples']} | {row['local_steps']} | "
                     f"{row['bn_statistics']} | {row['psnr']:.2f} | {row['psnr_gain_over_noise']:+.2f} | "
                     f"{row['consensus_psnr']:.2f} | {row['ssim']:.3f} | {row['iip']:.3g} | {row['label_accuracy']:.2f} |")
    lines += ["", *(f"- {line}" for line in sent["findings"]), "",
              "With `federation.send_buffers: false` the same clients keep their BatchNorm buffers, and the attack "
              "matches the global model's running statistics instead:", "",
              "| round | client | examples | gain over noise, buffers sent (dB) | buffers kept (dB) | "
              "label acc. sent / kept |", "|---|---|---|---|---|---|"]
    for a, b in zip(sent["rows"], kept["rows"]):
        lines.append(f"| {a['round']} | {a['client']} | {a['examples']} | {a['psnr_gain_over_noise']:+.2f} | "
                     f"{b['psnr_gain_over_noise']:+.2f} | {a['label_accuracy']:.2f} / {b['label_accuracy']:.2f} |")
    mean = lambda rows: sum(x["psnr_gain_over_noise"] for x in rows) / len(rows)  # noqa: E731
    lines += ["", f"Mean gain over noise: {mean(sent['rows']):+.2f} dB with the buffers sent, "
                  f"{mean(kept['rows']):+.2f} dB with them kept.", ""]
    for name, run in (("buffers sent", sent), ("buffers kept", kept)):
        lines.append(f"{name.capitalize()}: `{run['command']}` ({run['params']}), {run['minutes']} minutes "
                     f"including training the victim, at commit {_short(run['commit'])}, {run['date']}; machine: "
                     f"{run['machine']}" + (f"; {run['note']}" if run.get("note") else "") + ".")
    lines.append("Figures: [results/federation.json](results/federation.json), each run's "
                 "`data/federation/federation.json`.")
    return "\n".join(lines)


def _ms(x: dict, digits: int = 2) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def _share(x: float) -> str:
    return f"{100 * x:.2g} %"


def _iip(figures: dict) -> str:
    return f"{figures['iip']['mean']:.0%}" if "iip" in figures else "–"


def render_seed_choice(r: dict, result_file: str = "seed_choice.json") -> str:
    """docs/tuning.md: per many-batch run, what each output rule reports, how often it picks the
    best seed, how the final gradient distance ranks the seeds and the gradient term's share."""
    rules = ("objective", "gradient", "consensus")
    lines = ["| run | batches | reported by lowest final objective: PSNR (dB) / SSIM / IIP | by lowest gradient distance | "
             "by nearest the consensus | consensus | best seed (hindsight) PSNR | "
             "best seed picked: objective / gradient / consensus rule | "
             "rank correlation, gradient distance vs PSNR | final gradient distance / zero gradient's | "
             "gradient term's share, first → last iteration |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in r.items():
        s, n = run["summary"], run["summary"]["batches"]
        picked = [s[f"{rule}_rule"] for rule in rules]
        cons = s["consensus_reconstruction"]
        lines.append(f"| {name} | {n} | "
                     + "".join(f"{_ms(p['psnr'])} / {_ms(p['ssim'], 3)} / {_iip(p)} | " for p in picked)
                     + f"{_ms(cons['psnr'])} / {_ms(cons['ssim'], 3)} / {_iip(cons)} | {_ms(s['best_seed_psnr'])} | "
                     f"{' / '.join(str(p['picks_best']) for p in picked)} of {n} | "
                     f"{_ms(s['grad_psnr_rank_correlation'])} | "
                     f"{_ms(s['final_grad_relative'])} | {_share(s['grad_share_first']['mean'])} → "
                     f"{_share(s['grad_share_last']['mean'])} |")
    lines.append("")
    lines += [f"- {name}: {run['run_command']} ({', '.join(f'{k} {v}' for k, v in run['batches'][0]['params'].items())}); "
              f"machine: {run['machine']['cpu']}, {run['machine']['cpu_count']} cores; figures: `{run['command']}`."
              for name, run in r.items()]
    lines.append("Means ± standard deviations over the batches (the final gradient distance over every seed of "
                 f"every batch); every batch's figures: [results/{result_file}](results/{result_file}).")
    return "\n".join(lines)


# (Markdown file, block name, result file, renderer), paths relative to the project root.
BLOCKS: list[tuple[str, str, str, Callable[[dict], str]]] = [
    ("README.md", "results-table", "docs/results/default.json", render_default),
    ("docs/batches.md", "batches-table", "docs/results/batches.json", render_batches),
    ("docs/batches.md", "sweep-table", "docs/results/sweep.json", render_sweep),
    ("docs/audit.md", "audit-table", "docs/results/audit.json", render_audit),
    ("docs/audit.md", "audit-dp-table", "docs/results/audit_dp.json", render_audit_dp),
    ("docs/flower.md", "federation-table", "docs/results/federation.json", render_federation),
    ("docs/tuning.md", "seed-choice-table", "docs/results/seed_choice.json", render_seed_choice),
    ("docs/tuning.md", "seed-choice-tuning-table", "docs/results/seed_choice_tuning.json",
     lambda r: render_seed_choice(r, "seed_choice_tuning.json")),
]


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block_of(text: str, name: str) -> str:
    """What lies between the block's markers (ValueError when they are missing)."""
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"expected one '{start}' followed by one '{end}'")
    return text[text.index(start) + len(start):text.index(end)]


def replace_block(text: str, name: str, content: str) -> str:
    start, end = markers(name)
    block_of(text, name)
    return text[:text.index(start) + len(start)] + "\n" + content + "\n" + text[text.index(end):]


def render(result_file: str, renderer: Callable[[dict], str], root: Path = ROOT) -> str:
    return renderer(json.loads((root / result_file).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ from their render")
    args = parser.parse_args(argv)
    texts: dict[str, str] = {}
    stale = []
    for md, name, result_file, renderer in BLOCKS:  # every block rendered before any file is written
        text = texts.get(md, (ROOT / md).read_text())
        texts[md] = replace_block(text, name, render(result_file, renderer))
        if texts[md] != text:
            stale.append(f"{md}: {name}")
    if not args.check:
        for md, text in texts.items():
            if text != (ROOT / md).read_text():
                (ROOT / md).write_text(text)
    for entry in stale:
        print(("out of date: " if args.check else "rewrote: ") + entry)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
