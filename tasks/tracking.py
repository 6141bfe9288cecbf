"""MLflow logging of pipeline runs: params, per-stage metrics, the loss curve and the images.

The backend is a SQLite file in the project (MLflow 3 no longer accepts the plain file store)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from gradinv.attack.objective import LOSS_TERMS
from gradinv.pipeline.stages import EVAL, INVERT, LABELS, VICTIM

EXPERIMENT = "gradinv"


def tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{(Path(root).resolve() / 'mlflow.db')}"


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
            self.metrics({"seconds_per_iteration": info["seconds_per_iteration"], "chosen_seed": info["chosen_seed"]})
            if not live_curve_logged:
                for row in pq.read_table(root / INVERT / "loss.parquet").to_pylist():
                    self.metrics({f"seed{row['seed']}_{k}": row[k] for k in LOSS_TERMS},
                                 step=row["iteration"])
        elif stage_name == "evaluate":
            summary = json.loads((root / EVAL / "metrics.json").read_text())
            flat = {**summary, **{f"consensus_{k}": v for k, v in summary.get("consensus", {}).items()}}
            self.metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
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
            self.metrics({f"batch_{k}": row[k] for k in ("psnr", "ssim", "iip", "label_accuracy") if row[k] is not None},
                         step=row["batch"])
        for file in files:
            self.artifact(file, "batches")

    def log_sweep(self, table: dict[str, list], files: list[Path]) -> None:
        """Each figure of the sweep table as a series over the batch size, and its files."""
        for i, size in enumerate(table["batch_size"]):
            self.metrics({f"sweep_{k}": v[i] for k, v in table.items() if k != "batch_size" and v[i] is not None},
                         step=size)
        for file in files:
            self.artifact(file, "sweep")

    def log_child(self, run_name: str, params: dict[str, object], metrics: dict[str, float]) -> str:
        """A finished run grouped under this one (MLflow's parent-run tag); returns its id."""
        parent = self.client.get_run(self.run_id)
        child = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                       tags={"mlflow.parentRunId": self.run_id})
        Tracker(self.client, child.info.run_id).params(params)
        Tracker(self.client, child.info.run_id).metrics({k: v for k, v in metrics.items() if v is not None})
        self.client.set_terminated(child.info.run_id, "FINISHED")
        return child.info.run_id


@contextmanager
def tracked_run(root: str | Path, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    # An experiment made before artifact_location existed keeps the artifact location it was made with.
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(EXPERIMENT, artifact_location=artifact_location(root)))
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    status = "FAILED"
    try:
        yield Tracker(client, run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)
