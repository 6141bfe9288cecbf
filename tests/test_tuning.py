"""The balanced objective's settings (grad_share, l2_relative, the output choice) and the tuning flow."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from gradinv.errors import UserError
from gradinv.pipeline.config import build_section
from tests.conftest import write_params


def test_balanced_alpha_grad_gives_the_gradient_term_its_share_at_the_start():
    from gradinv.attack.objective import balanced_alpha_grad

    config = build_section("inversion", {"grad_share": 0.25, "alpha_tv": 0.5, "alpha_l2": 0.0, "alpha_bn": 2.0})
    start = [{"grad": 10.0, "tv": 4.0, "l2": 100.0, "bn": 1.0, "group": 0.0},
             {"grad": 30.0, "tv": 8.0, "l2": 100.0, "bn": 3.0, "group": 0.0}]
    # Means: grad 20, tv 6, bn 2; the priors weigh 0.5 * 6 + 2 * 2 = 7; 0.25 / 0.75 * 7 / 20.
    alpha = balanced_alpha_grad(start, config)
    assert alpha == pytest.approx(7 / 60)
    assert alpha * 20 / (alpha * 20 + 7) == pytest.approx(0.25)
    with pytest.raises(UserError, match="grad_share needs"):
        balanced_alpha_grad([{**row, "grad": 0.0} for row in start], config)


@pytest.mark.parametrize("share", [1.0, -0.1])
def test_grad_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(UserError, match="grad_share"):
        build_section("inversion", {"grad_share": share})


def test_an_inversion_with_grad_share_starts_at_that_share_and_records_its_alpha(attack):
    from gradinv.attack.inversion import invert
    from gradinv.pipeline.config import as_dict

    model, _, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 3, "seeds": 2, "warmup": 1, "log_every": 1, "grad_share": 0.4})
    result = invert(model, artifact, labels.tolist(), config)
    assert result.alpha_grad != config.alpha_grad
    first = [row for row in result.log if row["iteration"] == 0]
    weighted_grad = sum(result.alpha_grad * row["grad"] for row in first)
    assert weighted_grad / sum(row["total"] for row in first) == pytest.approx(0.4, rel=1e-4)
    # The logged shares weigh the gradient term with the weight used.
    row = first[0]
    assert row["share_grad"] == pytest.approx(result.alpha_grad * row["grad"] / row["total"], rel=1e-5)
    assert as_dict(config)["alpha_grad"] == 0.001  # the configured value is left as given


def test_l2_relative_divides_each_layers_distance_by_the_targets_norm():
    from gradinv.attack.objective import gradient_distance

    target = {"conv.weight": torch.tensor([[3.0, 4.0]]), "fc.bias": torch.tensor([0.0, 2.0]),
              "bn.bias": torch.tensor([1.0, 0.0])}
    grads = {"conv.weight": torch.tensor([[0.0, 4.0]]), "fc.bias": torch.tensor([0.0, 1.0]),
             "bn.bias": torch.tensor([1.0, 1.0])}
    # conv: 3 / 5; fc: 1 / 2; bn: 1 / 1 (weighted 2).
    assert float(gradient_distance(grads, target, "l2_relative", {"bn": 2.0})) == pytest.approx(0.6 + 0.5 + 2.0)
    zeros = {n: torch.zeros_like(t) for n, t in target.items()}
    assert float(gradient_distance(zeros, target, "l2_relative", {})) == pytest.approx(3.0)  # one per layer


def test_each_output_rule_reports_its_own_seed():
    from gradinv.attack.inversion import choose_seed

    consensus = torch.zeros(2, 3, 4, 4)
    images = torch.stack([consensus + 0.3, consensus - 0.1, consensus + 0.2])
    grad, objective = [5.0, 9.0, 1.0], [2.0, 3.0, 4.0]
    assert choose_seed("consensus", grad, objective, images, consensus) == 1
    assert choose_seed("gradient", grad, objective, images, consensus) == 2
    assert choose_seed("objective", grad, objective, images, consensus) == 0


def test_trial_settings_round_trip_through_the_search_space():
    import optuna

    from gradinv.pipeline.tuning import as_trial_params, resolve, suggest

    base = {**build_section("inversion", {}).__dict__, "alpha_group": 0.01, "group_start": 300, "iterations": 1000,
            "group_refresh": 10, "langevin": 0.2, "grad_share": 0.5, "gradient_distance": "l2_relative"}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(as_trial_params(base))
    trial = study.ask()
    settings = resolve(suggest(trial), base["iterations"])
    assert {k: base[k] for k in settings} == settings


def test_tuning_params_are_checked():
    with pytest.raises(UserError, match="tuning.enqueue"):
        build_section("tuning", {"enqueue": [3]})
    with pytest.raises(UserError, match="langevin"):
        build_section("tuning", {"enqueue": [{"langevin": -1}]})


@pytest.mark.slow
def test_the_tuning_flow_runs_two_trials_and_writes_its_study_and_the_chosen_settings(flows_project, shared_cluster):
    import optuna
    from mlflow.tracking import MlflowClient

    from flows.tune import study_name, tune
    from gradinv.pipeline.config import load_params
    from tasks.tracking import tracking_uri

    params = write_params(flows_project / "params.yaml", {
        "tuning": {"trials": 2, "batches": 1, "capture_seed": 50, "iterations": 4, "seeds": 2},
        "batches": {"address": shared_cluster.scheduler_address}})
    result = tune(str(params), str(flows_project))

    out = flows_project / "data/tune"
    study = optuna.load_study(study_name=study_name(load_params(params)), storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert done[0].user_attrs["settings"]["lr"] == load_params(params)["inversion"].lr  # params.yaml's settings first
    for trial in done:  # a trial's value: its tuning batch's reported PSNR
        metrics = json.loads((out / f"trial-{trial.number:03d}/batch-000/eval/metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["psnr"])
    drawn = [json.loads((out / f"trial-{t.number:03d}/batch-000/truth/truth.json").read_text())["pool_index"]
             for t in done]
    assert drawn[0] == drawn[1]  # every trial attacks the same tuning batch
    table = pq.read_table(out / "trials.parquet").to_pydict()
    assert table["trial"] == [0, 1] and table["psnr"] == [t.value for t in done]
    chosen = json.loads((out / "chosen.json").read_text())
    best = max(done, key=lambda t: t.value)
    assert chosen["trial"] == best.number and chosen["value"] == pytest.approx(best.value)
    assert chosen["inversion"]["lr"] == best.user_attrs["settings"]["lr"]
    assert result["chosen"] == chosen

    client = MlflowClient(tracking_uri(flows_project))
    children = client.search_runs([client.get_run(result["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(float(r.data.metrics["psnr"]) for r in children) == pytest.approx(sorted(t.value for t in done))


def test_the_seed_choice_summary_counts_the_rules_picks_of_the_best_seed():
    from benchmarks.seed_choice import rank_correlation, summarise

    assert rank_correlation([1.0, 2.0, 3.0], [9.0, 5.0, 4.0]) == pytest.approx(-1.0)
    assert rank_correlation([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    batch = {"grad_share_first": 0.01, "grad_share_last": 0.1, "grad_psnr_rank_correlation": -1.0,
             "final_grad_relative": [0.5, 0.7], "consensus_psnr": 14.0, "consensus_ssim": 0.2, "consensus_iip": 0.0}
    batches = [{**batch, "psnr": [12.0, 13.0], "ssim": [0.1, 0.2], "iip": [0.0, 0.5], "best_seed": 1,
                "picks": {"objective": 1, "gradient": 1, "consensus": 0}},
               {**batch, "psnr": [11.0, 10.0], "ssim": [0.3, 0.1], "iip": [0.25, 0.0], "best_seed": 0,
                "picks": {"objective": 0, "gradient": 1, "consensus": 0}}]
    summary = summarise(batches)
    assert summary["gradient_rule"]["picks_best"] == 1 and summary["consensus_rule"]["picks_best"] == 1
    assert summary["objective_rule"]["picks_best"] == 2
    assert summary["objective_rule"]["iip"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert summary["gradient_rule"]["psnr"]["mean"] == pytest.approx((13.0 + 10.0) / 2)
    assert summary["consensus_rule"]["ssim"]["mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert summary["best_seed_psnr"]["mean"] == pytest.approx(12.0)
    assert summary["final_grad_relative"]["mean"] == pytest.approx(0.6)


def test_the_tuning_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from flows.tune import main

    params = write_params(tmp_path / "params.yaml")
    assert main(["--params", str(params), "--root", str(tmp_path), "--trials", "0"]) == 2
    assert "--trials must be a positive number" in capsys.readouterr().err
    bad = write_params(tmp_path / "bad.yaml", {"tuning": {"metric": "lpips"}})
    assert main(["--params", str(bad), "--root", str(tmp_path)]) == 2
    assert "tuning.metric" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing written


def test_the_seed_choice_benchmark_recomputes_the_final_objective_as_the_attack_did(tiny_project, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from benchmarks.seed_choice import recomputed_objective
    from gradinv.attack.outputs import RECONSTRUCTION_FILE
    from gradinv.pipeline.folders import GRADIENT, INVERT, LABELS, VICTIM

    batch = tmp_path / "batch-000"  # a many-batch folder's layout
    shutil.copytree(tiny_project / GRADIENT, batch / "gradient")
    shutil.copytree(tiny_project / LABELS, batch / "labels")
    invert = json.loads((tiny_project / INVERT / "invert.json").read_text())
    seeds = load_file(str(tiny_project / INVERT / RECONSTRUCTION_FILE))["seeds"]
    recomputed = recomputed_objective(batch, invert, seeds, tiny_project / VICTIM)
    assert recomputed == pytest.approx(invert["final_objective"], rel=1e-3)
    assert len(set(invert["final_objective"])) == len(recomputed)  # the seeds differ: the match is not trivial


def test_the_tuning_page_states_what_its_result_files_hold():
    import json

    from tests.conftest import REPO

    text = " ".join((REPO / "docs" / "tuning.md").read_text().split())
    runs = json.loads((REPO / "docs" / "results" / "seed_choice.json").read_text())
    before = runs["paper weights (defaults before tuning)"]["summary"]
    now = runs["tuned (the defaults)"]["summary"]
    reported, previous = now["objective_rule"], before["gradient_rule"]
    assert (f"{reported['psnr']['mean']:.2f} dB against {previous['psnr']['mean']:.2f} dB, SSIM "
            f"{reported['ssim']['mean']:.3f} against {previous['ssim']['mean']:.3f}; the reported seed was the best in "
            f"{reported['picks_best']} of 8 batches, against {previous['picks_best']} of 8") in text
    assert (f"identifiable for {reported['iip']['mean']:.0%} of the images under the tuned settings, against "
            f"{previous['iip']['mean']:.0%} for the seed the paper's weights reported by the gradient rule and "
            f"{before['objective_rule']['iip']['mean']:.0%} for the one").replace("%", " %") in text
    assert (f"first seen on the paper-weights run below ({before['objective_rule']['picks_best']} of 8 against "
            f"{before['gradient_rule']['picks_best']} of 8)") in text
    trials = json.loads((REPO / "docs" / "results" / "seed_choice_tuning.json").read_text()).values()
    picks = {rule: sum(t["summary"][f"{rule}_rule"]["picks_best"] for t in trials)
             for rule in ("objective", "gradient", "consensus")}
    batches = sum(t["summary"]["batches"] for t in trials)
    assert (f"seed {picks['objective']} times in {batches}, the gradient rule {picks['gradient']}, "
            f"the consensus rule {picks['consensus']}") in text
