"""What a finished flow run leaves in Prefect's UI: a markdown artifact with its headline figures
and where its report and MLflow run are, so that the UI answers "how did last night's run go"."""

from __future__ import annotations

from pathlib import Path

from gradinv.evaluation.context import Tracking

MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_link(tracking: Tracking) -> str:
    return f"{MLFLOW_UI}/#/experiments/{tracking.mlflow_experiment_id}/runs/{tracking.mlflow_run_id}"


def summary_markdown(title: str, figures: dict[str, str], files: dict[str, Path], tracking: Tracking) -> str:
    lines = [f"## {title}", "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in figures.items()), ""]
    links = {name: Path(path).resolve().as_uri() for name, path in files.items()}
    lines += [f"- {name}: [{uri}]({uri})" for name, uri in links.items()]
    lines += [f"- MLflow run: [{tracking.mlflow_run_id}]({mlflow_link(tracking)}) (`make mlflow-ui` serves it)",
              f"- command: `{tracking.command}`"]
    return "\n".join(lines)


def publish(key: str, title: str, figures: dict[str, str], files: dict[str, Path], tracking: Tracking) -> None:
    """A markdown artifact under `key` (lowercase letters, digits and dashes) on the running flow run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(title, figures, files, tracking), key=key, description=title)


def where_to_look(files: dict[str, Path], tracking: Tracking) -> str:
    """The terminal's last lines: the outputs as file:// links, then the two browsers."""
    width = max(len(name) for name in (*files, "Prefect")) + 1
    lines = [f"{name + ':':{width}} {Path(path).resolve().as_uri()}" for name, path in files.items()]
    lines += [f"{'MLflow:':{width}} run {tracking.mlflow_run_id}: make mlflow-ui, then {mlflow_link(tracking)}",
              f"{'Prefect:':{width}} make server, then http://127.0.0.1:4200 (past flow runs and their summaries)"]
    return "\n".join(lines)
