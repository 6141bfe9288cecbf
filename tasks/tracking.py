"""MLflow logging of pipeline runs: params, per-stage metrics, the loss curve and the images.

The backend is a SQLite file in the project (MLflow 3 no longer accepts the plain file store)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from gradinv.attack.objective import loss_metrics
from gradinv.evaluation.context import Tracking
from gradinv.pipeline.stages import EVAL, INVERT, LABELS, VICTIM
from gradinv.provenance import code_version, dvc_lock_digest

EXPERIMENT = "gradinv"
# MLflow 3's UI opens an experiment of this kind as model training (runs, metrics, charts).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Figures of metrics.json that describe the run rather than measure it: logged as params.
SETTINGS_IN_RESULTS = ("batch_size", "chosen_seed", "gallery_size")


def tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db')}"


def run_name(kind: str, params: dict) -> str:
    """What the run is, as its MLflow name: e.g. `pipeline resnet18 bs8 G4 700it`."""
    return (f"{kind} {params['victim'].arch} bs{params['capture'].batch_size} G{params['inversion'].seeds} "
            f"{params['inversion'].iterations}it")


def source_tags(root: str | Path, command: str) -> dict[str, str]:
    """The code's commit, branch and uncommitted changes, and dvc.lock's hash, as run tags."""
    code = code_version()
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    if code["commit"]:
        tags |= {"mlflow.source.git.commit": code["commit"], "mlflow.source.git.branch": str(code["branch"]),
                 "git_dirty": str(code["dirty"]).lower()}
    lock = dvc_lock_digest(root)
    if lock:
        tags["dvc_lock_sha256"] = lock
    return tags


def artifact_location(root: str | Path) -> str:
    """Where the experiment keeps its artifacts: under the project root, whatever the working folder."""
    return str(Path(root).resolve() / "mlartifacts")


class Tracker:
    """Logs to one MLflow run by id (explicit ids keep task threads from sharing global state)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def params(self, values: dict[str, object]) -> None:
        for key, value in values.items():
            self.client.log_param(self.run_id, key, json.dumps(value) if isinstance(value, (list, dict)) else value)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_stage(self, stage_name: str, root: str | Path, live_curve_logged: bool) -> None:
        """Summary metrics and files of a finished stage, read back from its outputs."""
        root = Path(root)
        if stage_name == "train":
            info = json.loads((root / VICTIM / "model.json").read_text())
            self.metrics({"victim_train_accuracy": info["train_accuracy"], "victim_pool_accuracy": info["pool_accuracy"]})
        elif stage_name == "labels":
            self.artifact(root / LABELS / "labels.json", "labels")
        elif stage_name == "invert":
            info = json.loads((root / INVERT / "invert.json").read_text())
            self.metrics({"seconds_per_iteration": info["seconds_per_iteration"]})
            self.params({"chosen_seed": info["chosen_seed"]})
            if not live_curve_logged:
                for row in pq.read_table(root / INVERT / "loss.parquet").to_pylist():
                    self.metrics(loss_metrics(row), step=row["iteration"])
        elif stage_name == "evaluate":
            summary = json.loads((root / EVAL / "metrics.json").read_text())
            flat = {**summary, **{f"consensus_{k}": v for k, v in summary.get("consensus", {}).items()}}
            self.params({k: flat[k] for k in SETTINGS_IN_RESULTS if k in flat})
            self.metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                          and k not in SETTINGS_IN_RESULTS})
            for name in ("grid.png", "metrics.json", "per_image.parquet", "report.html"):
                self.artifact(root / EVAL / name, "evaluation")

    def log_batches(self, rows: list[dict], files: list[Path]) -> None:
        """The many-batch aggregate (metric_mean, metric_std, overall_*), each batch's figures
        as a series over the batch index, and the table and summary files."""
        summary = json.loads(next(Path(f) for f in files if Path(f).name == "summary.json").read_text())
        flat = {}
        for key, value in summary.items():
            if isinstance(value, dict):
                flat.update({f"{key}_mean": value["mean"], f"{key}_std": value["std"]})
            elif isinstance(value, (int, float)):
                flat[key] = value
        self.metrics(flat)
        for row in rows:
            figures = {k: row[k] for k in ("psnr", "ssim", "iip", "label_accuracy")}
            self.metrics({f"batch_{k}": v for k, v in figures.items() if v is not None}, step=row["batch"])
            self.log_child(f"batch {row['batch']}", {"capture.seed": row["capture_seed"]}, figures)
        for file in files:
            self.artifact(file, "batches")

    def log_sweep(self, table: dict[str, list], files: list[Path]) -> None:
        """Each figure of the sweep table as a series over the batch size, and its files."""
        for i, size in enumerate(table["batch_size"]):
            self.metrics({f"sweep_{k}": v[i] for k, v in table.items() if k != "batch_size" and v[i] is not None},
                         step=size)
        for file in files:
            self.artifact(file, "sweep")

    def tracking(self, command: str) -> Tracking:
        """Where this run is tracked, for a stage's report."""
        return Tracking(command, self.run_id, self.client.get_run(self.run_id).info.experiment_id)

    def log_child(self, run_name: str, params: dict[str, object], metrics: dict[str, float]) -> str:
        """A finished run grouped under this one (MLflow's parent-run tag, and the parent's source
        tags); returns its id."""
        parent = self.client.get_run(self.run_id)
        inherited = {k: v for k, v in parent.data.tags.items()
                     if k.startswith("mlflow.source.") or k in ("git_dirty", "dvc_lock_sha256")}
        child = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                       tags={**inherited, "mlflow.parentRunId": self.run_id})
        Tracker(self.client, child.info.run_id).params(params)
        Tracker(self.client, child.info.run_id).metrics({k: v for k, v in metrics.items() if v is not None})
        self.client.set_terminated(child.info.run_id, "FINISHED")
        return child.info.run_id


def _experiment(client: MlflowClient, root: str | Path) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location(root), tags=EXPERIMENT_TAGS)
    # An experiment made before these tags (or artifact_location) keeps its artifact location, and gets the tags.
    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextmanager
def tracked_run(root: str | Path, run_name: str, command: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """One MLflow run named `run_name`, tagged with the code's version and the command that started it."""
    client = MlflowClient(tracking_uri=tracking_uri(root))
    run = client.create_run(_experiment(client, root), run_name=run_name,
                            tags={**source_tags(root, command), **(tags or {})})
    status = "FAILED"
    try:
        yield Tracker(client, run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
