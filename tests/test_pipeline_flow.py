"""The whole pipeline through Prefect and MLflow on the tiny project: caching and tracking."""

import json

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import main, pipeline
from gradinv.pipeline.stages import EVAL, STAGES
from tasks.tracking import EXPERIMENT, tracking_uri
from tests.conftest import write_params


def _computed(results):
    return [name for name in STAGES if not results[name]["cached"]]


@pytest.mark.slow
def test_flow_runs_every_stage_then_caches_and_reruns_only_what_changed(tmp_path, prefect_api_url):
    params = write_params(tmp_path / "params.yaml")
    first = pipeline(str(params), str(tmp_path))
    assert _computed(first) == list(STAGES)
    metrics = json.loads((tmp_path / EVAL / "metrics.json").read_text())
    assert metrics["label_accuracy"] == 1.0 and metrics["batch_size"] == 4

    assert _computed(pipeline(str(params), str(tmp_path))) == []

    write_params(params, {"inversion": {"iterations": 4}})
    assert _computed(pipeline(str(params), str(tmp_path))) == ["invert", "evaluate"]

    (tmp_path / EVAL / "metrics.json").unlink()  # a cached result whose files are gone is recomputed
    (tmp_path / EVAL / "grid.png").unlink()
    (tmp_path / EVAL / "per_image.parquet").unlink()
    assert _computed(pipeline(str(params), str(tmp_path))) == ["evaluate"]

    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    latest = max(runs, key=lambda run: run.info.start_time)
    assert latest.data.metrics["psnr"] == pytest.approx(json.loads((tmp_path / EVAL / "metrics.json").read_text())["psnr"])
    assert latest.data.params["inversion.iterations"] == "4"
    assert {a.path for a in client.list_artifacts(latest.info.run_id, "evaluation")} >= {"evaluation/grid.png", "evaluation/report.html"}
    assert "iip" in latest.data.metrics and "consensus_psnr" in latest.data.metrics
    curve = client.get_metric_history(runs[-1].info.run_id, "seed0_total")
    assert len(curve) >= 3  # the first run logged the loss curve while it inverted


def test_flow_entry_point_rejects_bad_params_before_starting(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"capture": {"bn_leak": "sometimes"}})
    assert main(["--params", str(params), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capture.bn_leak" in err[0]
    assert not (tmp_path / "data").exists()
