"""The run's report reads as a report: what leaked first, the run's context, class names, units
and definitions, a caption that says which loss term drives the attack; the audit's plots show
only figures that vary."""

import html
import re

import pytest

from gradinv.attack.objective import TERM_WEIGHTS, term_shares
from gradinv.evaluation.figures import TERM_NAMES
from gradinv.evaluation.glossary import METRICS, verdict
from gradinv.pipeline.audit import defense_findings, shown_panels
from gradinv.pipeline.stages import EVAL, INVERT, VICTIM
from gradinv.provenance import code_version


@pytest.fixture(scope="module")
def page(tiny_project):
    return (tiny_project / EVAL / "report.html").read_text()


def test_the_first_screen_says_what_leaked_with_the_numbers(tiny_project, page):
    import json

    metrics = json.loads((tiny_project / EVAL / "metrics.json").read_text())
    first = page[:page.index("<h2>")]
    assert verdict(metrics["label_accuracy"], metrics["iip"], metrics["psnr_gain_over_noise"]) in first
    batch = metrics["batch_size"]
    assert f"{round(metrics['label_accuracy'] * batch)} of {batch} labels recovered" in first
    assert f"PSNR {metrics['psnr']:.1f} dB, {metrics['psnr_gain_over_noise']:+.1f} dB over the starting noise" in first


def test_the_run_context_names_model_batch_attack_commit_and_how_to_reproduce(tiny_project, page):
    import json

    victim = json.loads((tiny_project / VICTIM / "model.json").read_text())
    context = page[page.index("<h2>Run</h2>"):page.index("<h2>Originals")]
    for what in ("Model", "Data", "Client batch", "Shared with the gradient", "Defenses", "Attack", "Inverted",
                 "Code", "MLflow", "Reproduce"):
        assert f"<td>{what}</td>" in context
    assert f"{victim['arch']}, {victim['num_classes']} classes" in context
    commit = code_version()["commit"]
    assert (commit[:12] if commit else "not a git checkout") in context
    assert "6 iterations × 2 seeds" in context and "dvc repro" in context


def test_tiles_carry_class_names_and_headings_carry_units_and_definitions(tiny_project, page):
    import json

    classes = json.loads((tiny_project / VICTIM / "model.json").read_text())["classes"]
    truth = json.loads((tiny_project / "data/capture/truth/truth.json").read_text())["labels"]
    captions = re.findall(r"<figcaption>([^<]+)<br>", page)
    assert captions == [classes[label] for label in truth]
    assert f'title="{METRICS["psnr"].definition}">PSNR (dB)</th>' in page
    assert "<th>psnr</th>" not in page and "psnr_gain_over_noise" not in page
    assert page.count('<div class="scroll"><table') == page.count("<table")  # every table scrolls in its box


def test_the_loss_caption_gives_each_terms_share_and_names_the_dominant_term(tiny_project, page):
    import json

    import pyarrow.parquet as pq

    weights = json.loads((tiny_project / INVERT / "invert.json").read_text())["params"]
    rows = pq.read_table(tiny_project / INVERT / "loss.parquet").to_pylist()
    last = [r for r in rows if r["iteration"] == max(r["iteration"] for r in rows)]
    shares = {t: sum(term_shares(r, weights)[t] for r in last) / len(last) for t in TERM_NAMES}
    caption = html.unescape(re.search(r"At the last iteration, [^<]+", page).group(0))
    for term, share in shares.items():
        if share >= 0.005:
            assert f"{TERM_NAMES[term]} {100 * share:.0f} %" in caption
    leader = max(shares, key=shares.get)
    assert (f"The {TERM_NAMES[leader]} dominates" in caption) == (leader != "grad")


def test_term_shares_weigh_each_term_and_sum_to_one():
    weights = {"alpha_grad": 1e-3, "alpha_tv": 1e-4, "alpha_l2": 1e-6, "alpha_bn": 0.1, "alpha_group": 0.0}
    row = {"grad": 300.0, "tv": 50.0, "l2": 20.0, "bn": 4.0, "group": 7.0}
    shares = term_shares(row, weights)
    total = 0.3 + 0.005 + 0.00002 + 0.4
    assert set(shares) == set(TERM_WEIGHTS)
    assert shares["grad"] == pytest.approx(0.3 / total) and shares["bn"] == pytest.approx(0.4 / total)
    assert shares["group"] == 0 and sum(shares.values()) == pytest.approx(1)


@pytest.mark.parametrize("labels, iip, gain, expected", [
    (1.0, 0.75, 9.0, "all its labels and images most of which can be recognised"),
    (1.0, 0.125, 4.0, "all its labels and images some of which can be recognised"),
    (1.0, 0.0, 4.0, "all its labels and its images' coarse content (none recognisable)"),
    (0.5, 0.0, 1.0, "most of its labels and no recognisable image content"),
    (0.25, 0.0, 1.0, "few of its labels and no recognisable image content"),
])
def test_the_verdict_ranks_recognisable_images_over_psnr_over_labels(labels, iip, gain, expected):
    assert verdict(labels, iip, gain) == f"The shared gradient gives away {expected}."


def _row(defense, strength, psnr, iip=0.0, labels=1.0, cosine=1.0):
    return {"defense": defense, "strength": strength, "psnr": psnr, "ssim": psnr / 100, "iip": iip,
            "label_accuracy": labels, "utility_cosine": cosine, "psnr_initial_noise": 8.0}


def test_audit_plots_show_only_the_figures_that_vary_and_findings_name_the_strongest_setting():
    rows = [_row("none", None, 12.0), _row("topk", 0.5, 11.0, cosine=0.9), _row("topk", 0.1, 10.0, cosine=0.5),
            _row("quantize", "float16", 12.0), _row("quantize", "int8", 12.0)]
    assert shown_panels(rows, "topk") == ["psnr", "ssim", "utility_cosine"]  # IIP and labels never move
    assert shown_panels(rows, "quantize") == ["psnr"]  # nothing moves: PSNR alone, against its references
    with_bn = [{**r, "gradient_only_psnr": 10.0 - (r["strength"] == 0.1)} for r in rows]
    assert shown_panels(with_bn, "topk") == ["psnr", "ssim", "gradient_only_psnr", "utility_cosine"]
    without_bn = [{**r, "gradient_only_psnr": r["psnr"]} for r in rows]  # the attack had the gradient alone
    assert shown_panels(without_bn, "topk") == ["psnr", "ssim", "utility_cosine"]
    findings = defense_findings(rows)
    assert findings[0].startswith("Undefended: PSNR 12.0 dB (starting noise 8.0 dB)")
    assert "topk: at its strongest setting (fraction kept 0.1), PSNR 10.0 dB" in findings[1]
    assert "gradient cosine 0.50" in findings[1]


def test_the_loss_table_records_each_terms_share_and_they_match_its_terms(tiny_project):
    import json

    import pyarrow.parquet as pq

    from gradinv.attack.objective import loss_metrics

    weights = json.loads((tiny_project / INVERT / "invert.json").read_text())["params"]
    rows = pq.read_table(tiny_project / INVERT / "loss.parquet").to_pylist()
    for row in rows:
        weighted = {t: weights[w] * row[t] for t, w in TERM_WEIGHTS.items()}
        assert sum(row[f"share_{t}"] for t in TERM_WEIGHTS) == pytest.approx(1.0)
        for term in TERM_WEIGHTS:
            assert row[f"share_{term}"] == pytest.approx(weighted[term] / sum(weighted.values()))
        assert sum(weighted.values()) == pytest.approx(row["total"], rel=1e-4)  # the logged total is their sum
    metrics = loss_metrics(rows[0])
    assert metrics[f"share/grad/seed{rows[0]['seed']}"] == rows[0]["share_grad"]


def test_the_final_gradient_distance_is_read_against_an_all_zero_gradients(tiny_project, attack, page):
    import json

    from gradinv.attack.objective import Objective
    from gradinv.pipeline.config import InversionConfig

    _, _, artifact, _, labels = attack
    info = json.loads((tiny_project / INVERT / "invert.json").read_text())
    zero = sum(float(g.norm()) for g in artifact.grads.values())  # the l2 distance: Σ_l ‖ΔW_l‖
    assert info["zero_gradient_distance"] == pytest.approx(zero, rel=1e-4)
    assert info["final_grad_relative"] == pytest.approx([f / zero for f in info["final_grad_loss"]], rel=1e-4)
    cosine = Objective(attack[0], artifact, labels, InversionConfig(gradient_distance="cosine", bn_prior="none"))
    assert cosine.zero_gradient_distance() == pytest.approx(1.0)
    metrics = json.loads((tiny_project / EVAL / "metrics.json").read_text())
    assert metrics["final_grad_relative"] == info["final_grad_relative"][info["chosen_seed"]]
    assert f"{100 * metrics['final_grad_relative']:.0f} % of an all-zero gradient's distance" in html.unescape(page)
