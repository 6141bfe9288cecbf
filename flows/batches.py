"""The paper's many-batch figures: N random client batches attacked in parallel, then mean ± std
of every metric and IIP over all images.

    python -m flows.batches              # batches.count batches, params.yaml
    python -m flows.batches --count 16
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from flows.fan_out import run_fan_out, victim_ready
from gradinv.errors import UserError
from gradinv.pipeline.batches import BATCHES, write_batches
from gradinv.pipeline.config import as_dict, load_params
from tasks.batches import ATTACK_SECTIONS, attack_params
from tasks.publishing import publish, where_to_look
from tasks.tracking import run_name, tracked_run


@flow(name="gradinv-batches", log_prints=True)
def many_batches(params_path: str = "params.yaml", root: str = ".", count: int | None = None) -> dict:
    """Returns {"summary": aggregate, "paths": files written, "mlflow_run_id": id}."""
    params = load_params(params_path)
    config = params["batches"]
    count = count or config.count
    root = str(Path(root).resolve())
    attack = attack_params(params)
    command = f"python -m flows.batches --params {params_path} --root {root} --count {count}"
    with tracked_run(root, run_name(f"batches {count}×", params), command, tags={"batches": str(count)}) as tracker:
        tracker.params({f"{s}.{k}": v for s in ATTACK_SECTIONS for k, v in attack[s].items()}
                       | {f"batches.{k}": v for k, v in as_dict(config).items()} | {"batches.count": count})
        sections = {s: as_dict(params[s]) for s in ("data", "victim")}
        victim_ready(root, sections, tracker)
        jobs = [{"out": BATCHES, "index": i, "params": attack} for i in range(count)]
        rows = run_fan_out(root, jobs, config)
        paths = write_batches(rows, Path(root) / BATCHES)
        tracker.log_batches(rows, paths)
        summary = _read_summary(paths)
        files = {"table": Path(root) / BATCHES / "per_batch.parquet", "summary": Path(root) / BATCHES / "summary.json"}
        tracking = tracker.tracking(command)
        publish("gradinv-batches", f"gradinv batches: {count} batches", {"result": describe(summary)}, files, tracking)
    return {"summary": summary, "paths": [str(p) for p in paths], "mlflow_run_id": tracker.run_id,
            "files": files, "tracking": tracking}


def _read_summary(paths: list[Path]) -> dict:
    import json

    return json.loads(next(p for p in paths if p.name == "summary.json").read_text())


def describe(summary: dict) -> str:
    psnr, ssim, alone = summary["psnr"], summary["ssim"], summary.get("gradient_only_psnr")
    text = (f"{summary['batches']} batches, {summary['images']} images: PSNR {psnr['mean']:.2f} ± {psnr['std']:.2f} dB, "
            f"SSIM {ssim['mean']:.3f} ± {ssim['std']:.3f}, IIP {summary['overall_iip']:.1%}, "
            f"label accuracy {summary['overall_label_accuracy']:.1%}")
    if alone:
        text += (f"; from the gradient alone (without the BN statistics): PSNR {alone['mean']:.2f} ± "
                 f"{alone['std']:.2f} dB, SSIM {summary['gradient_only_ssim']['mean']:.3f}")
    return text


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        if args.count is not None and args.count < 1:
            raise UserError(f"--count must be a positive number of batches, got {args.count}.")
        result = many_batches(args.params, args.root, args.count)
        return f"{describe(result['summary'])}\n{where_to_look(result['files'], result['tracking'])}"

    def count_argument(parser) -> None:
        parser.add_argument("--count", type=int, help="number of batches (default: batches.count)")

    return run_flow_command("python -m flows.batches", __doc__, run, argv, count_argument)

if __name__ == "__main__":
    sys.exit(main())
