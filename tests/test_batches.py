"""Many batches: aggregation against independent computations, and the Dask fan-out flows."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gradinv.errors import UserError
from gradinv.io import read_tensors
from gradinv.pipeline.audit_grid import audit_points
from gradinv.pipeline.batches import aggregate, sweep_table
from gradinv.pipeline.config import load_params
from tests.conftest import REPO, write_params


def _row(index, batch_size, psnr, iip, label_accuracy=1.0):
    return {"batch": index, "batch_size": batch_size, "psnr": psnr, "ssim": 0.1 * index, "lpips": None,
            "fft2d": 1.0, "registered_psnr": psnr + 1, "iip": iip, "label_accuracy": label_accuracy,
            "psnr_initial_noise": 8.0, "psnr_gain_over_noise": psnr - 8.0, "consensus_psnr": psnr + 0.5,
            "consensus_ssim": 0.2, "consensus_iip": iip, "invert_seconds": 2.0}


def test_aggregate_means_stds_and_image_weighted_fractions():
    generator = torch.Generator().manual_seed(0)
    psnrs = (10 + 5 * torch.rand(5, generator=generator)).tolist()
    sizes = [2, 4, 4, 8, 2]
    iips = [0.5, 0.25, 1.0, 0.125, 0.0]
    summary = aggregate([_row(i, b, p, q) for i, (b, p, q) in enumerate(zip(sizes, psnrs, iips))])
    assert summary["psnr"]["mean"] == pytest.approx(statistics.mean(psnrs), abs=1e-12)
    assert summary["psnr"]["std"] == pytest.approx(statistics.stdev(psnrs), abs=1e-12)
    assert summary["lpips"] is None  # never computed, so never averaged as zero
    assert summary["images"] == 20
    # IIP over all images: (1 + 1 + 4 + 1 + 0) hits of 20 images, not the mean of the batch means.
    assert summary["overall_iip"] == pytest.approx(7 / 20)
    assert summary["overall_iip"] != pytest.approx(statistics.mean(iips))


def test_one_batch_has_zero_spread():
    summary = aggregate([_row(0, 4, 12.0, 0.5)])
    assert summary["psnr"] == {"mean": 12.0, "std": 0.0, "n": 1}


def test_sweep_table_groups_rows_by_batch_size():
    rows = [_row(0, 4, 10.0, 0.5), _row(1, 4, 12.0, 0.0), _row(0, 2, 14.0, 1.0)]
    table = sweep_table(rows)
    assert table["batch_size"] == [2, 4]
    assert table["batches"] == [1, 2]
    assert table["psnr_mean"] == [14.0, 11.0]
    assert table["psnr_std"][1] == pytest.approx(statistics.stdev([10.0, 12.0]))
    assert table["overall_iip"] == [1.0, 0.25]
    assert table["gradient_only_psnr_mean"] == [None, None]  # no batch was attacked without BN statistics
    alone = sweep_table([{**r, "gradient_only_psnr": r["psnr"] - 3} for r in rows])
    assert alone["gradient_only_psnr_mean"] == [11.0, 8.0]
    from flows.sweep import describe

    assert "gradient alone" not in describe(table)
    assert describe(alone).splitlines()[1].endswith("|  11.00 ±  0.00")


def test_sweep_refuses_batch_sizes_above_the_class_count():
    from flows.sweep import check_sizes

    check_sizes([2, 12], distinct_labels=True, num_classes=12)
    check_sizes([48], distinct_labels=False, num_classes=12)
    with pytest.raises(UserError, match="20, more than the 12 classes"):
        check_sizes([2, 20], distinct_labels=True, num_classes=12)


@pytest.mark.slow
def test_three_batch_fan_out_on_a_two_worker_local_cluster(flows_project, prefect_api_url):
    from mlflow.tracking import MlflowClient

    from flows.batches import many_batches
    from tasks.tracking import tracking_uri

    params = write_params(flows_project / "params.yaml", {"batches": {"count": 3, "workers": 2}})
    result = many_batches(str(params), str(flows_project))

    table = pq.read_table(flows_project / "data/batches/per_batch.parquet").to_pydict()
    assert table["batch"] == [0, 1, 2]
    assert table["capture_seed"] == [1, 2, 3]  # capture.seed + i
    folders = [flows_project / f"data/batches/batch-{i:03d}" for i in range(3)]
    drawn = [read_tensors(f / "truth/truth.safetensors", "truth")["pool_index"].tolist() for f in folders]
    assert len({tuple(d) for d in drawn}) == 3  # three different client batches

    # The aggregate, recomputed from each batch's own evaluation output.
    metrics = [json.loads((f / "eval/metrics.json").read_text()) for f in folders]
    hits = [pq.read_table(f / "eval/per_image.parquet").column("iip_hit").to_pylist() for f in folders]
    summary = result["summary"]
    assert summary["psnr"]["mean"] == pytest.approx(statistics.mean(m["psnr"] for m in metrics), abs=1e-9)
    assert summary["psnr"]["std"] == pytest.approx(statistics.stdev(m["psnr"] for m in metrics), abs=1e-9)
    assert summary["overall_iip"] == pytest.approx(sum(map(sum, hits)) / sum(map(len, hits)))
    assert summary["images"] == 3 * 4
    assert json.loads((flows_project / "data/batches/summary.json").read_text()) == summary

    run = MlflowClient(tracking_uri(flows_project)).get_run(result["mlflow_run_id"])
    assert run.data.metrics["psnr_mean"] == pytest.approx(summary["psnr"]["mean"])

    # The BN statistics leaked: each batch was attacked again without them, on the same gradient and labels.
    alone = [json.loads((f / "gradient-only/eval/metrics.json").read_text()) for f in folders]
    assert summary["gradient_only_psnr"]["mean"] == pytest.approx(statistics.mean(m["psnr"] for m in alone), abs=1e-9)
    assert table["gradient_only_ssim"] == [m["ssim"] for m in alone]
    for folder in folders:
        invert_info = json.loads((folder / "gradient-only/invert/invert.json").read_text())
        assert invert_info["params"]["bn_prior"] == "none"
        assert invert_info["labels"] == json.loads((folder / "labels/labels.json").read_text())["labels"]
        losses = pq.read_table(folder / "gradient-only/invert/loss.parquet").column("bn").to_pylist()
        assert max(losses) == 0.0


@pytest.mark.slow
def test_sweep_flow_writes_a_table_and_plot_per_batch_size(flows_project, shared_cluster):
    from flows.sweep import sweep

    params = write_params(flows_project / "params.yaml", {"sweep": {"batch_sizes": [2, 4], "batches": 1},
                                                          "evaluation": {"gradient_only": False},
                                                          "batches": {"address": shared_cluster.scheduler_address}})
    transitions = shared_cluster.scheduler.transition_counter
    result = sweep(str(params), str(flows_project))
    assert shared_cluster.scheduler.transition_counter > transitions  # the batches ran on the given cluster
    table = pq.read_table(flows_project / "data/sweep/sweep.parquet").to_pydict()
    assert table["batch_size"] == [2, 4]
    for size, psnr in zip(table["batch_size"], table["psnr_mean"]):
        metrics = json.loads((flows_project / f"data/sweep/bs-{size:03d}/batch-000/eval/metrics.json").read_text())
        assert metrics["batch_size"] == size
        assert psnr == pytest.approx(metrics["psnr"])
        assert not (flows_project / f"data/sweep/bs-{size:03d}/batch-000/gradient-only").exists()  # switched off
    png = (flows_project / "data/sweep/sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert result["table"] == table


@pytest.mark.slow
def test_the_audit_attacks_at_its_own_budget_with_the_group_pull_at_the_same_share():
    from gradinv.pipeline.audit import at_budget
    from gradinv.pipeline.config import build_section

    inversion = build_section("inversion", {"iterations": 700, "seeds": 4, "group_start": 210, "alpha_group": 0.01})
    budget = at_budget(inversion, 200, 2)
    assert (budget.iterations, budget.seeds, budget.group_start) == (200, 2, 60)
    assert budget.alpha_group == 0.01 and budget.lr == inversion.lr


def test_defense_audit_tabulates_leakage_and_utility_per_defense(flows_project, shared_cluster):
    from mlflow.tracking import MlflowClient

    from flows.audit import audit
    from tasks.tracking import tracking_uri

    grid = {"noise_sigmas": [0.1], "topk_keep": [1.0, 0.01], "aggregation_clients": [2],
            "quantize": ["sign"], "fedavg_steps": [1], "iterations": 4, "seeds": 2}
    params = write_params(flows_project / "params.yaml",
                          {"audit": grid, "batches": {"address": shared_cluster.scheduler_address}})
    result = audit(str(params), str(flows_project))

    table = pq.read_table(flows_project / "data/audit/audit.parquet").to_pydict()
    assert table["defense"] == ["none", "clip+gaussian", "topk", "topk", "secure_aggregation", "fedavg", "quantize"]
    rows = {(r["defense"], str(r["strength"])): r for r in result["rows"]}
    assert rows[("none", "None")]["utility_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[("topk", "1.0")]["utility_relative_error"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("topk", "0.01")]["utility_cosine"] < rows[("topk", "1.0")]["utility_cosine"]
    assert rows[("clip+gaussian", "0.1")]["utility_cosine"] < 0.5  # noise of std 0.1 per entry drowns a norm-1 gradient
    assert rows[("secure_aggregation", "2")]["utility_cosine"] < 0.99
    assert rows[("clip+gaussian", "0.1")]["labels_warned"] and not rows[("none", "None")]["labels_warned"]
    assert rows[("fedavg", "1")]["attack"] == "aware of fedavg" and rows[("topk", "0.01")]["attack"] == "aware of topk"
    assert rows[("clip+gaussian", "0.1")]["attack"] == "plain"
    # Two leaks apart: where BN statistics leaked, a second attack without them; under fedavg none leak, and
    # the attack's own figures are the gradient's alone.
    for row in result["rows"]:
        alone = json.loads((Path(row["folder"]) / ("eval" if row["defense"] == "fedavg" else "gradient-only/eval")
                            / "metrics.json").read_text())
        assert row["gradient_only_psnr"] == pytest.approx(alone["psnr"])
    assert table["gradient_only_psnr"] == [r["gradient_only_psnr"] for r in result["rows"]]
    assert "from the gradient alone" in (flows_project / "data/audit/audit.html").read_text()
    for defense in ("clip+gaussian", "topk", "secure_aggregation", "fedavg", "quantize"):
        assert (flows_project / f"data/audit/{defense}.png").read_bytes()[:4] == b"\x89PNG"
    assert "leakage against defense strength" in (flows_project / "data/audit/audit.html").read_text()

    client = MlflowClient(tracking_uri(flows_project))
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 7


@pytest.mark.slow
def test_the_dp_audit_attacks_a_groupnorm_victim_at_each_target_epsilon(tiny_project, tmp_path, shared_cluster):
    from flows.audit import audit

    root = tmp_path / "project"
    shutil.copytree(tiny_project / "data/sets", root / "data/sets")
    grid = {"noise_sigmas": [], "topk_keep": [], "aggregation_clients": [], "quantize": [], "fedavg_steps": [],
            "dp_epsilons": ["inf", 8], "dp_sample_rate": 0.05, "dp_steps": 10, "iterations": 4, "seeds": 2}
    params = write_params(tmp_path / "params.yaml", {
        "victim": {"norm": "group"}, "capture": {"bn_leak": "none"}, "inversion": {"bn_prior": "none"},
        "audit": grid, "batches": {"address": shared_cluster.scheduler_address}})
    result = audit(str(params), str(root))

    assert [(r["defense"], r["strength"]) for r in result["rows"]] == [("none", None), ("dp_sgd", "inf"), ("dp_sgd", 8)]
    recorded = [json.loads((Path(r["folder"]) / "gradient/gradient.json").read_text())["defenses"] for r in result["rows"]]
    assert recorded[0] == [] and recorded[1][0]["noise_multiplier"] == 0 and recorded[1][0]["epsilon"] is None
    assert recorded[2][0]["epsilon"] <= 8 and recorded[2][0]["noise_multiplier"] > 0
    assert json.loads((root / "data/victim/model.json").read_text())["norm"] == "group"
    assert result["rows"][2]["utility_cosine"] < result["rows"][1]["utility_cosine"]  # noise on top of clipping
    assert (root / "data/audit/dp_sgd.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # the accountant's search for σ at every target ε takes seconds
def test_the_dp_axis_is_refused_on_a_batchnorm_victim_and_bn_settings_on_a_groupnorm_one(tmp_path):
    from flows.audit import check_victim_for

    dp = {"dp_epsilons": ["inf", 8], "dp_steps": 10}
    params = load_params(write_params(tmp_path / "params.yaml", {"audit": dp}))
    with pytest.raises(UserError, match="needs a victim without BatchNorm: set victim.norm: group"):
        check_victim_for(audit_points(params["audit"]), params)
    params = load_params(write_params(tmp_path / "params.yaml", {"audit": dp, "victim": {"norm": "group"}}))
    with pytest.raises(UserError, match="set capture.bn_leak: none and inversion.bn_prior: none"):
        check_victim_for(audit_points(params["audit"]), params)
    preset = load_params(REPO / "params.yaml", preset="dp")
    assert preset["victim"].norm == "group" and preset["audit"].dp_epsilons == ["inf", 50, 8, 3, 1]
    check_victim_for(audit_points(preset["audit"]), preset)


def test_the_audit_page_states_what_its_result_file_holds():
    text = " ".join((REPO / "docs" / "audit.md").read_text().split())
    rows = json.loads((REPO / "docs" / "results" / "audit.json").read_text())["rows"]
    none = next(r for r in rows if r["defense"] == "none")
    gradient_defenses = [r for r in rows if r["defense"] in ("clip+gaussian", "topk", "quantize", "secure_aggregation")]
    strongest_noise = [r for r in rows if r["defense"] == "clip+gaussian"][-1]
    fedavg = [r["psnr"] for r in rows if r["defense"] == "fedavg"]
    span = lambda values: f"{min(values):.2f}–{max(values):.2f} dB"  # noqa: E731
    assert f"undefended point reaches {none['psnr']:.2f} dB at this budget (the starting noise: " \
           f"{none['psnr_initial_noise']:.2f} dB). From the gradient alone" in text
    assert f"it reaches {none['gradient_only_psnr']:.2f} dB." in text
    assert f"gradient-only PSNR stays within {span([r['gradient_only_psnr'] for r in gradient_defenses])}" in text
    assert (f"at σ {strongest_noise['strength']}, where the shared gradient's cosine with the clean one is "
            f"{strongest_noise['utility_cosine']:.3f}, it is {strongest_noise['gradient_only_psnr']:.2f} dB") in text
    assert f"leave the image leak as it is: {span([r['psnr'] for r in gradient_defenses])}" in text.replace("**", "")
    assert f"the replayed update: {span(fedavg)}" in text


def test_the_dp_section_states_what_its_result_files_hold():
    text = " ".join((REPO / "docs" / "audit.md").read_text().split())
    section = text[text.index("## DP-SGD against ε"):text.index("## Reading")]
    rows = json.loads((REPO / "docs" / "results" / "audit_dp.json").read_text())["rows"]
    cosine_run = json.loads((REPO / "docs" / "results" / "audit_dp_cosine.json").read_text())
    none, clipped, *noisy = rows
    assert (none["defense"], clipped["strength"]) == ("none", "inf")
    assert f"reaches {none['psnr']:.2f} dB (SSIM {none['ssim']:.3f}) and no image is recognisable" in section
    assert none["iip"] == 0
    assert f"falls to {noisy[0]['utility_cosine']:.3f}, the labels fall to 4 of 8" in section
    assert all(r["label_accuracy"] == 0.5 for r in noisy)
    psnrs = [r["psnr"] for r in noisy]
    assert f"PSNR stays within {min(psnrs):.2f}–{max(psnrs):.2f} dB" in section
    [matched] = [r for r in noisy if r["iip"] > 0]
    assert (f"matched at ε {matched['strength']} (IIP {matched['iip']:.3g}) comes from a gradient whose cosine with "
            f"the clean one is {matched['utility_cosine']:.3f}") in section
    assert (f"scores lower, {clipped['psnr']:.2f} dB with SSIM {clipped['ssim']:.3f}: the clipped gradient is far "
            f"smaller than the clean one (relative error {clipped['utility_relative_error']:.3f} at cosine "
            f"{clipped['utility_cosine']:.3f})") in section
    assert clipped["psnr"] < none["psnr"] and clipped["label_accuracy"] == 1.0
    cosine_none, cosine_clipped = cosine_run["rows"][:2]
    assert f"{cosine_run['minutes']} minutes" in section and cosine_run["commit"] == \
        json.loads((REPO / "docs" / "results" / "audit_dp.json").read_text())["commit"]
    assert f"scores what the undefended one does: {cosine_clipped['psnr']:.2f} and {cosine_none['psnr']:.2f} dB" in section


def test_the_batches_page_says_how_closely_batch_0_reproduces_the_pipeline_run():
    text = " ".join((REPO / "docs" / "batches.md").read_text().split())
    batch_0 = json.loads((REPO / "docs" / "results" / "batches.json").read_text())["psnr"]["per_batch"][0]
    pipeline = json.loads((REPO / "docs" / "results" / "default.json").read_text())["metrics"]["psnr"]
    assert "reproduces its figures up to the float rounding of another torch thread count (under a tenth of a dB)" in text
    assert abs(batch_0 - pipeline) < 0.1


def test_the_sweep_prose_states_what_its_result_file_holds():
    text = " ".join((REPO / "docs" / "batches.md").read_text().split())
    rows = {row["batch_size"]: row for row in json.loads((REPO / "docs" / "results" / "sweep.json").read_text())["rows"]}
    smallest = rows[min(rows)]
    assert smallest["psnr"]["mean"] == min(row["psnr"]["mean"] for row in rows.values()), "the smallest batch leaked least"
    assert (f"{smallest['psnr']['mean']:.2f} dB with them, {smallest['gradient_only_psnr']['mean']:.2f} dB from the "
            "gradient alone") in text
    assert "at batch size 8 the two batches' PSNR happen to agree to a thousandth of a dB" in text
    assert rows[8]["psnr"]["std"] < 0.005 and rows[8]["gradient_only_psnr"]["std"] > 0.1
