"""Tuning the attack: the inversion settings Optuna searches, and how a trial is scored.

A trial attacks `tuning.batches` batches drawn with capture seeds apart from the ones the other
flows report on (tuning.capture_seed + i), under the trial's settings at the tuning budget
(tuning.iterations, tuning.seeds), and is scored by the mean of `tuning.metric` of the reported
reconstruction over them. The first trials are the settings params.yaml holds, then each
`tuning.enqueue` entry: the search can only end at or above them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradinv.errors import UserError
from gradinv.io import write_json, write_table
from gradinv.pipeline.config import InversionConfig, as_dict

TUNE = "data/tune"
STUDY_FILE, TRIALS_FILE, CHOSEN_FILE = "study.db", "trials.parquet", "chosen.json"


def suggest(trial) -> dict[str, Any]:
    """One trial's inversion settings (an optuna.trial.Trial); the others keep params.yaml's values.
    The gradient term's weight is searched as its share of the objective at the start
    (inversion.grad_share, where `balance` is on), which reads alike on any victim and in any
    gradient distance; the group pull's start as a percentage of the iterations."""
    settings = {
        "lr": trial.suggest_float("lr", 0.02, 0.3, log=True),
        "gradient_distance": trial.suggest_categorical("gradient_distance", ["l2", "l2_relative", "cosine"]),
        "alpha_bn": trial.suggest_float("alpha_bn", 1e-3, 1.0, log=True),
        "alpha_tv": trial.suggest_float("alpha_tv", 1e-6, 1e-2, log=True),
        "langevin": trial.suggest_float("langevin", 0.0, 0.4),
        "jitter": trial.suggest_int("jitter", 0, 2),
        "flip": trial.suggest_categorical("flip", [False, True]),
        "choose": trial.suggest_categorical("choose", ["gradient", "consensus", "objective"]),
        "grad_share": 0.0,
        "alpha_group": 0.0,
    }
    if trial.suggest_categorical("balance", [False, True]):
        settings["grad_share"] = trial.suggest_float("grad_share", 0.05, 0.95)
    if trial.suggest_categorical("group", [False, True]):
        settings["alpha_group"] = trial.suggest_float("alpha_group", 1e-3, 0.1, log=True)
        settings["group_start_percent"] = trial.suggest_int("group_start_percent", 0, 50, step=10)
        settings["group_refresh"] = trial.suggest_categorical("group_refresh", [10, 25, 50])
    return settings


def trial_inversion(base: InversionConfig, settings: dict[str, Any], iterations: int, seeds: int) -> dict[str, Any]:
    """The inversion section a trial runs: params.yaml's, the trial's settings over it, at the
    tuning budget; a group start given as a percentage becomes that share of the iterations."""
    return {**as_dict(base), **resolve(settings, iterations), "iterations": iterations, "seeds": seeds}


def resolve(settings: dict[str, Any], iterations: int) -> dict[str, Any]:
    """A trial's settings as inversion settings for a run of `iterations`: the group pull's start
    from its percentage."""
    settings = dict(settings)
    percent = settings.pop("group_start_percent", None)
    if percent is not None:
        settings["group_start"] = iterations * percent // 100
    return settings


def as_trial_params(inversion: dict[str, Any]) -> dict[str, Any]:
    """Settings of an inversion section in the search's own names, for enqueueing them as a trial."""
    params = {k: inversion[k] for k in ("lr", "gradient_distance", "alpha_bn", "alpha_tv", "langevin", "jitter",
                                        "flip", "choose")}
    params["balance"] = inversion["grad_share"] > 0
    if params["balance"]:
        params["grad_share"] = inversion["grad_share"]
    params["group"] = inversion["alpha_group"] > 0
    if params["group"]:
        iterations = max(1, inversion["iterations"])
        params |= {"alpha_group": inversion["alpha_group"], "group_refresh": inversion["group_refresh"],
                   "group_start_percent": min(50, 10 * round(10 * inversion["group_start"] / iterations))}
    return params


def score(rows: list[dict], metric: str) -> float:
    """A trial's value: the mean of `metric` of the reported reconstruction over its batches."""
    values = [row[metric] for row in rows]
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise UserError(f"a tuning trial gave no finite {metric} on its batches: {values}.")
    return sum(values) / len(values)


def write_results(out: Path, study, metric: str, command: str, base_inversion: dict[str, Any]
                  ) -> tuple[list[Path], dict[str, Any]]:
    """trials.parquet (every finished trial: number, value, its settings) and chosen.json (the
    best trial's settings, as inversion settings to put in params.yaml at its iterations, its value
    and the command).
    Each trial carries its settings as the user attribute `settings`. Returns the files and chosen.json's content."""
    finished = [t for t in study.trials if t.value is not None]
    if not finished:
        raise UserError("no tuning trial finished; nothing to choose from.")
    names = sorted({name for t in finished for name in t.params})
    table = {"trial": [t.number for t in finished], metric: [t.value for t in finished],
             **{name: [_cell(t.params.get(name)) for t in finished] for name in names}}
    best = study.best_trial
    settings = resolve(best.user_attrs["settings"], base_inversion["iterations"])
    chosen = {"metric": metric, "value": best.value, "trial": best.number, "trials": len(finished),
              "command": command, "inversion": settings,
              "changed": {k: v for k, v in settings.items() if base_inversion.get(k) != v}}
    return [write_table(out / TRIALS_FILE, table), write_json(out / CHOSEN_FILE, chosen)], chosen


def _cell(value):
    """A parameter as a table cell: one column type for a parameter whose trials mix bools and absences."""
    return None if value is None else str(value)
