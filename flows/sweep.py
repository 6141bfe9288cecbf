"""Leakage against batch size: for each size in sweep.batch_sizes, sweep.batches random batches
attacked on the Dask fan-out; a table and a plot of PSNR, IIP and label accuracy.

    python -m flows.sweep
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from flows.fan_out import run_fan_out, victim_ready
from gradinv.client.data import load_meta
from gradinv.errors import UserError
from gradinv.evaluation.figures import save_sweep_plot
from gradinv.io import write_json, write_table
from gradinv.pipeline.batches import SWEEP, sweep_table
from gradinv.pipeline.config import as_dict, load_params
from tasks.batches import attack_params
from tasks.publishing import publish, where_to_look
from tasks.tracking import run_name, tracked_run


def check_sizes(sizes: list[int], distinct_labels: bool, num_classes: int) -> None:
    too_big = [s for s in sizes if distinct_labels and s > num_classes]
    if too_big:
        raise UserError(f"params: 'sweep.batch_sizes' has {too_big[0]}, more than the {num_classes} classes "
                        "that distinct-label batches allow (set capture.distinct_labels: false for larger ones).")


@flow(name="gradinv-sweep", log_prints=True)
def sweep(params_path: str = "params.yaml", root: str = ".") -> dict:
    """Returns {"table": columns, "paths": files written, "mlflow_run_id": id}."""
    params = load_params(params_path)
    config, batches = params["sweep"], params["batches"]
    root = str(Path(root).resolve())
    command = f"python -m flows.sweep --params {params_path} --root {root}"
    sizes = ",".join(map(str, config.batch_sizes))
    name = run_name("sweep", params).replace(f" bs{params['capture'].batch_size} ", f" bs{sizes} ")
    with tracked_run(root, name, command, tags={"batch_sizes": sizes}) as tracker:
        tracker.params({f"sweep.{k}": v for k, v in as_dict(config).items()})
        victim_ready(root, {s: as_dict(params[s]) for s in ("data", "victim")}, tracker)
        check_sizes(config.batch_sizes, params["capture"].distinct_labels, load_meta(Path(root) / "data/sets").num_classes)
        jobs = []
        for size in config.batch_sizes:
            attack = attack_params(params)
            attack["capture"] = as_dict(dataclasses.replace(params["capture"], batch_size=size))
            jobs += [{"out": f"{SWEEP}/bs-{size:03d}", "index": i, "params": attack} for i in range(config.batches)]
        rows = run_fan_out(root, jobs, batches)
        table = sweep_table(rows)
        out = Path(root) / SWEEP
        paths = [write_table(out / "sweep.parquet", table), save_sweep_plot(table, out / "sweep.png"),
                 write_json(out / "sweep.json", {"table": table, "params": as_dict(config)})]
        tracker.log_sweep(table, paths)
        files = {"table": out / "sweep.parquet", "plot": out / "sweep.png"}
        tracking = tracker.tracking(command)
        publish("gradinv-sweep", f"gradinv sweep: batch sizes {sizes}", {"result": describe(table)}, files, tracking)
    return {"table": table, "paths": [str(p) for p in paths], "mlflow_run_id": tracker.run_id,
            "files": files, "tracking": tracking}


def describe(table: dict[str, list]) -> str:
    alone = table.get("gradient_only_psnr_mean", [])
    shown = any(v is not None for v in alone)
    lines = ["batch size | PSNR (dB)      | IIP   | label accuracy" + (" | PSNR, gradient alone" if shown else "")]
    for i, size in enumerate(table["batch_size"]):
        lines.append(f"{size:10d} | {table['psnr_mean'][i]:6.2f} ± {table['psnr_std'][i]:5.2f} | "
                     f"{table['overall_iip'][i]:5.1%} | {table['label_accuracy_mean'][i]:.1%}"
                     + (f" | {alone[i]:6.2f} ± {table['gradient_only_psnr_std'][i]:5.2f}" if shown else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        result = sweep(args.params, args.root)
        return f"{describe(result['table'])}\n{where_to_look(result['files'], result['tracking'])}"

    return run_flow_command("python -m flows.sweep", __doc__, run, argv)

if __name__ == "__main__":
    sys.exit(main())
