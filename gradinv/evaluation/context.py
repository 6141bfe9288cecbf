"""The run's context for its report: model, data, batch, what leaked with the gradient, the
defenses, the attack's budget, when, from which code, where it is tracked, how to reproduce it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gradinv.io import read_json
from gradinv.provenance import code_version

REPRODUCE = "dvc repro"  # reruns every stage that is stale against params.yaml and dvc.lock


@dataclass(frozen=True)
class Tracking:
    """Where the run that writes the report is tracked, and the command that started it."""
    command: str = REPRODUCE
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None


@dataclass
class RunContext:
    rows: list[tuple[str, str]] = field(default_factory=list)  # (what, plain text) in reading order
    class_names: list[str] = field(default_factory=list)
    defenses: str = "none"


def describe_defenses(defenses: list[dict], aggregation_clients: int) -> str:
    parts = [d["kind"] + (" (" + ", ".join(f"{k} {v}" for k, v in d.items() if k != "kind") + ")"
                          if len(d) > 1 else "") + (": not DP, BatchNorm couples the samples"
                                                    if d.get("batch_coupled") else "") for d in defenses]
    if aggregation_clients > 1:
        parts.append(f"secure aggregation over {aggregation_clients} clients")
    return "; ".join(parts) or "none"


def _accuracy(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0%}"


def run_context(victim_dir: Path, gradient_dir: Path, labels_dir: Path, invert_dir: Path, true_labels: list[int],
                tracking: Tracking) -> RunContext:
    victim = read_json(victim_dir / "model.json", "victim metadata")
    gradient = read_json(gradient_dir / "gradient.json", "gradient metadata")
    labels = read_json(labels_dir / "labels.json", "recovered labels")
    invert = read_json(invert_dir / "invert.json", "inversion summary")
    attack = invert.get("params", {})
    names = [str(c) for c in victim.get("classes") or range(victim["num_classes"])]
    side = victim["input_shape"][-1]
    distinct = len(set(true_labels)) == len(true_labels)
    leaked = ("the batch's BatchNorm mean and variance (BN_exact)" if gradient.get("bn_leak") == "exact"
              else "the gradient only")
    defenses = describe_defenses(gradient.get("defenses", []), gradient.get("aggregation_clients", 1))
    code = code_version()
    commit = "not a git checkout" if code["commit"] is None else (
        f"{code['commit'][:12]} on {code['branch']}" + (", with uncommitted changes" if code["dirty"] else ""))
    mlflow = ("not tracked (run through `make run` to track it)" if tracking.mlflow_run_id is None else
              f"run {tracking.mlflow_run_id}: `make mlflow-ui`, then http://127.0.0.1:5000/#/experiments/"
              f"{tracking.mlflow_experiment_id}/runs/{tracking.mlflow_run_id}")
    rows = [
        ("Model", f"{victim['arch']}, {victim['num_classes']} classes, "
                  f"pool accuracy {_accuracy(victim.get('pool_accuracy'))}"),
        ("Data", f"{side}×{side} px; classes: {', '.join(names)}"),
        ("Client batch", f"{len(true_labels)} images, " + ("one per class" if distinct else "with repeated labels")),
        ("Shared with the gradient", leaked),
        ("Defenses", defenses),
        ("Attack", f"{attack.get('iterations', '?')} iterations × {attack.get('seeds', '?')} seeds, "
                   f"BN prior {attack.get('bn_prior', '?')}, labels by the {labels.get('strategy', '?')} rule"),
        ("Inverted", invert.get("finished", "unknown")),
        ("Code", commit),
        ("MLflow", mlflow),
        ("Reproduce", f"`{tracking.command}` at that commit"),
    ]
    return RunContext(rows, names, defenses)
