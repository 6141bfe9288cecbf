"""The GradInversion pipeline as one Prefect flow: every stage a cached task, one MLflow run.

    python -m flows.pipeline                 # all stages, params.yaml
    python -m flows.pipeline --stage invert  # one stage (what dvc.yaml runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from gradinv.errors import UserError
from gradinv.pipeline.config import as_dict, load_params
from gradinv.pipeline.stages import EVAL, STAGES
from tasks.publishing import publish, where_to_look
from tasks.stages import run_cached_stage
from tasks.tracking import run_name, tracked_run, tracking_uri


@flow(name="gradinv-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", root: str = ".", stages: list[str] | None = None) -> dict:
    """Run `stages` (default: all) in order. Returns {stage: {"paths": [...], "cached": bool}}."""
    params = load_params(params_path)  # every section validated before any work starts
    names = stages or list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"unknown stage '{unknown[0]}' (known: {', '.join(STAGES)}).")
    root = str(Path(root).resolve())
    results: dict[str, dict] = {}
    command = (f"python -m flows.pipeline --params {params_path} --root {root}"
               + "".join(f" --stage {n}" for n in stages or ()))
    name = run_name("pipeline" if stages is None else "+".join(names), params)
    with tracked_run(root, name, command, tags={"stages": ",".join(names)}) as tracker:
        tracking = tracker.tracking(command)
        for name in names:
            section = STAGES[name].section
            tracker.params({f"{section}.{k}": v for k, v in as_dict(params[section]).items()})
        if any(STAGES[name].uses_engine for name in names):
            tracker.params({f"engine.{k}": v for k, v in as_dict(params["engine"]).items()})
        for name in names:
            section_params = as_dict(params[STAGES[name].section])
            engine = as_dict(params["engine"]) if STAGES[name].uses_engine else None
            paths, cached = run_cached_stage(name, root, section_params, tracker, engine, tracking)
            tracker.log_stage(name, root, live_curve_logged=not cached)
            results[name] = {"paths": paths, "cached": cached}
            print(f"{name}: {'cached' if cached else 'done'} -> {', '.join(STAGES[name].outputs)}")
        results["mlflow"] = {"tracking_uri": tracking_uri(root), "run_id": tracker.run_id}
        results["tracking"], results["root"] = tracking, root
        results["files"] = _files(Path(root), "evaluate" in names)
        publish("gradinv-pipeline", f"gradinv pipeline: {name}", _figures(Path(root)) if "evaluate" in names else {},
                results["files"], tracking)
    return results


def _files(root: Path, evaluated: bool) -> dict[str, Path]:
    if not evaluated:
        return {}
    return {"report": root / EVAL / "report.html", "grid": root / EVAL / "grid.png",
            "metrics": root / EVAL / "metrics.json"}


def _figures(root: Path) -> dict[str, str]:
    import json

    m = json.loads((root / EVAL / "metrics.json").read_text())
    return {"PSNR": f"{m['psnr']:.2f} dB ({m['psnr_gain_over_noise']:+.2f} dB over the starting noise, "
                    f"{m['psnr_initial_noise']:.2f} dB)",
            "SSIM": f"{m['ssim']:.3f}", "IIP": f"{m['iip']:.0%} of images recognisable",
            "label accuracy": f"{m['label_accuracy']:.0%}"}


def _summary(results: dict) -> str:
    figures = _figures(Path(results["root"])) if results["files"] else {}
    lines = [f"{k}: {v}" for k, v in figures.items()]
    return "\n".join([*lines, where_to_look(results["files"], results["tracking"])])


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        return _summary(pipeline(args.params, args.root, args.stage))

    def stage_argument(parser) -> None:
        parser.add_argument("--stage", action="append", choices=list(STAGES), help="run only this stage (repeatable)")

    return run_flow_command("python -m flows.pipeline", __doc__, run, argv, stage_argument)

if __name__ == "__main__":
    sys.exit(main())
