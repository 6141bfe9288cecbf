"""The whole pipeline through Prefect and MLflow on the tiny project: caching and tracking."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import main, pipeline
from gradinv.pipeline.stages import EVAL, STAGES
from gradinv.provenance import code_version
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
    first = min(runs, key=lambda run: run.info.start_time)
    curve = client.get_metric_history(first.info.run_id, "loss/total/seed0")
    assert len({m.step for m in curve}) >= 3  # the first run logged the loss curve while it inverted
    assert client.get_metric_history(first.info.run_id, "loss/grad/seed1")
    _check_tracking(client, runs, latest, tmp_path)
    _check_prefect_summary(tmp_path, metrics_after=json.loads((tmp_path / EVAL / "metrics.json").read_text()))


def _check_tracking(client, runs, latest, root):
    """MLflow as a training-experiment browser: named runs, the code's commit, settings as params."""
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    assert all(re.fullmatch(r"pipeline resnet18 bs4 G2 \d+it", run.info.run_name) for run in runs)
    assert latest.info.run_name == "pipeline resnet18 bs4 G2 4it"
    tags = latest.data.tags
    commit = code_version()["commit"]
    if commit:
        assert tags["mlflow.source.git.commit"] == commit and tags["git_dirty"] in ("true", "false")
    assert tags["mlflow.source.name"].startswith("python -m flows.pipeline --params ")
    for setting in ("batch_size", "chosen_seed", "gallery_size"):
        assert setting in latest.data.params and setting not in latest.data.metrics
    assert latest.data.params["batch_size"] == "4"


def _check_prefect_summary(root, metrics_after):
    """Each flow run left a markdown artifact with the headline figures and the report's link."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gradinv-pipeline"])))
    artifacts = [a for a in artifacts if f"--root {root.resolve()}" in a.data]  # the session's server holds others
    assert len(artifacts) == 4 and all(a.type == "markdown" for a in artifacts)
    latest = max(artifacts, key=lambda a: a.created)
    assert f"| PSNR | {metrics_after['psnr']:.2f} dB" in latest.data
    assert (root / EVAL / "report.html").resolve().as_uri() in latest.data


def test_flow_entry_point_rejects_bad_params_before_starting(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"capture": {"bn_leak": "sometimes"}})
    assert main(["--params", str(params), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capture.bn_leak" in err[0]
    assert not (tmp_path / "data").exists()
