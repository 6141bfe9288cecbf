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
from tasks.stages import run_cached_stage
from tasks.tracking import tracked_run, tracking_uri


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
    run_name = "pipeline" if stages is None else "stage-" + "-".join(names)
    with tracked_run(root, run_name, tags={"stages": ",".join(names)}) as tracker:
        for name in names:
            section = STAGES[name].section
            tracker.params({f"{section}.{k}": v for k, v in as_dict(params[section]).items()})
        if any(STAGES[name].uses_engine for name in names):
            tracker.params({f"engine.{k}": v for k, v in as_dict(params["engine"]).items()})
        for name in names:
            section_params = as_dict(params[STAGES[name].section])
            engine = as_dict(params["engine"]) if STAGES[name].uses_engine else None
            paths, cached = run_cached_stage(name, root, section_params, tracker, engine)
            tracker.log_stage(name, root, live_curve_logged=not cached)
            results[name] = {"paths": paths, "cached": cached}
            print(f"{name}: {'cached' if cached else 'done'} -> {', '.join(STAGES[name].outputs)}")
        results["mlflow"] = {"tracking_uri": tracking_uri(root), "run_id": tracker.run_id}
    return results


def _summary(results: dict, root: Path) -> str:
    lines = []
    if "evaluate" in results:
        import json

        metrics = json.loads((root / EVAL / "metrics.json").read_text())
        lines += [
            f"mean matched PSNR {metrics['psnr']:.2f} dB (initial noise {metrics['psnr_initial_noise']:.2f} dB, "
            f"gain {metrics['psnr_gain_over_noise']:+.2f} dB), SSIM {metrics['ssim']:.3f}, "
            f"label accuracy {metrics['label_accuracy']:.0%}",
            f"grid:    {root / EVAL / 'grid.png'}",
            f"metrics: {root / EVAL / 'metrics.json'} and {root / EVAL / 'per_image.parquet'}",
        ]
    mlflow_info = results["mlflow"]
    lines.append(f"MLflow:  run {mlflow_info['run_id']} in {mlflow_info['tracking_uri']} "
                 f"(browse: make mlflow-ui, then http://127.0.0.1:5000)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        return _summary(pipeline(args.params, args.root, args.stage), Path(args.root).resolve())

    def stage_argument(parser) -> None:
        parser.add_argument("--stage", action="append", choices=list(STAGES), help="run only this stage (repeatable)")

    return run_flow_command("python -m flows.pipeline", __doc__.splitlines()[0], run, argv, stage_argument)

if __name__ == "__main__":
    sys.exit(main())
