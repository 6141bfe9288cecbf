"""Tune the attack: Optuna searches the inversion settings on tuning batches (capture seeds apart
from the ones reported), each trial's batches fanned out on the Dask workers; the study lives in
data/tune/study.db, so a rerun goes on where it stopped. Writes data/tune/trials.parquet and
data/tune/chosen.json, the best settings to put in params.yaml and evaluate with flows.batches.

    python -m flows.tune                 # tuning.trials trials, params.yaml
    python -m flows.tune --trials 4
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from flows.fan_out import run_fan_out, victim_ready
from gradinv.errors import UserError
from gradinv.pipeline.config import as_dict, load_params
from gradinv.pipeline.tuning import (CHOSEN_FILE, STUDY_FILE, TRIALS_FILE, TUNE, as_trial_params, score, suggest,
                                     trial_inversion, write_results)
from tasks.batches import attack_params
from tasks.publishing import publish, where_to_look
from tasks.tracking import run_name, tracked_run


def study_name(params: dict) -> str:
    """Trials compare only under one set-up: the study is named after everything but the searched
    settings (data, victim, capture, labels, evaluation and the tuning section) and after the search
    space's code (Optuna refuses a parameter whose choices changed within a study)."""
    setup = {s: as_dict(params[s]) for s in ("data", "victim", "capture", "labels", "evaluation", "tuning")}
    setup["search_space"] = inspect.getsource(suggest)
    return "tune-" + hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]


def open_study(root: Path, params: dict):
    import optuna

    config = params["tuning"]
    (root / TUNE).mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{root / TUNE / STUDY_FILE}", study_name=study_name(params),
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=config.sampler_seed))
    if not study.trials:  # params.yaml's own settings first, then the ones the user asks to try
        base = as_dict(params["inversion"])
        for entry in [{}, *config.enqueue]:
            study.enqueue_trial(as_trial_params({**base, **entry}), skip_if_exists=True)
    stale = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number in stale:  # left running by an interrupted run: their batches are cached, a new trial reruns them
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return study


def finished(study) -> int:
    return sum(t.value is not None for t in study.trials)


@flow(name="gradinv-tune", log_prints=True)
def tune(params_path: str = "params.yaml", root: str = ".", trials: int | None = None) -> dict:
    """Returns {"chosen": chosen.json's content, "paths": files written, "mlflow_run_id": id}.
    Each trial is an MLflow child run of the study's run, with its settings and value."""
    params = load_params(params_path)
    config = params["tuning"]
    trials = trials or config.trials
    root_path = Path(root).resolve()
    command = f"python -m flows.tune --params {params_path} --root {root_path} --trials {trials}"
    base = as_dict(params["inversion"])
    with tracked_run(root_path, run_name(f"tune {trials} trials", params), command, tags={"tuning": "study"}) as tracker:
        tracker.params({f"tuning.{k}": v for k, v in as_dict(config).items()})
        victim_ready(str(root_path), {s: as_dict(params[s]) for s in ("data", "victim")}, tracker)
        study = open_study(root_path, params)
        at_once = max(1, params["batches"].workers // config.batches)
        while finished(study) < trials:
            asked = [study.ask() for _ in range(min(at_once, trials - finished(study)))]
            jobs = []
            for trial in asked:
                settings = suggest(trial)
                trial.set_user_attr("settings", settings)
                attack = attack_params(params)
                attack["inversion"] = trial_inversion(params["inversion"], settings, config.iterations, config.seeds)
                attack["capture"] = {**attack["capture"], "seed": config.capture_seed}
                attack["evaluation"] = {**attack["evaluation"], "gradient_only": False}  # trials score one attack
                jobs += [{"out": f"{TUNE}/trial-{trial.number:03d}", "index": i, "params": attack, "trial": trial}
                         for i in range(config.batches)]
            rows = run_fan_out(str(root_path), [{k: v for k, v in job.items() if k != "trial"} for job in jobs],
                               params["batches"])
            for trial in asked:
                value = score([row for job, row in zip(jobs, rows) if job["trial"] is trial], config.metric)
                study.tell(trial, value)
                tracker.log_child(f"trial {trial.number}", trial.params, {config.metric: value})
                tracker.metrics({f"trial_{config.metric}": value, f"best_{config.metric}": study.best_value},
                                step=trial.number)
                print(f"trial {trial.number}: {config.metric} {value:.3f} (best {study.best_value:.3f}, "
                      f"trial {study.best_trial.number})")
        paths, chosen = write_results(root_path / TUNE, study, config.metric, command, base)
        for path in paths:
            tracker.artifact(path, "tune")
        files = {"chosen": root_path / TUNE / CHOSEN_FILE, "trials": root_path / TUNE / TRIALS_FILE}
        tracking = tracker.tracking(command)
        publish("gradinv-tune", f"gradinv tune: {trials} trials", {"result": describe(chosen)}, files, tracking)
    return {"chosen": chosen, "paths": [str(p) for p in paths], "mlflow_run_id": tracker.run_id,
            "files": files, "tracking": tracking}


def describe(chosen: dict) -> str:
    changed = ", ".join(f"{k} {v}" for k, v in chosen["changed"].items()) or "none (params.yaml's settings were best)"
    return (f"best of {chosen['trials']} trials: trial {chosen['trial']}, {chosen['metric']} {chosen['value']:.3f} "
            f"on the tuning batches; settings changed from params.yaml: {changed}")


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        if args.trials is not None and args.trials < 1:
            raise UserError(f"--trials must be a positive number of trials, got {args.trials}.")
        result = tune(args.params, args.root, args.trials)
        return f"{describe(result['chosen'])}\n{where_to_look(result['files'], result['tracking'])}"

    def trials_argument(parser) -> None:
        parser.add_argument("--trials", type=int, help="trials the study should hold (default: tuning.trials)")

    return run_flow_command("python -m flows.tune", __doc__, run, argv, trials_argument)


if __name__ == "__main__":
    sys.exit(main())
