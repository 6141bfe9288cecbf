"""Federation audit: the embedded Flower federation (Simulation Engine) with the recorder on the
server, then the attack on the recorded replies of the chosen rounds, scored against each
client's own examples.

    python -m flows.federation [--engine deployment]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from flows.fan_out import run_fan_out, victim_ready
from gradinv.errors import UserError
from gradinv.evaluation.report import write_federation_html
from gradinv.io import write_json, write_table
from gradinv.pipeline import federation as fed
from gradinv.pipeline.config import as_dict, load_params
from tasks.batches import attack_params
from tasks.federation import federation_done
from tasks.publishing import publish, where_to_look
from tasks.tracking import run_name, tracked_run


def attack_settings(params: dict) -> dict:
    """The attack of every reply: the federation's budget; labels with repeats (clients hold
    several examples of a class); the BN prior on what the buffers gave away, or on the global
    model's running statistics when no buffers were sent."""
    config = params["federation"]
    attack = attack_params(params)
    prior = "exact" if config.send_buffers else "approx"
    if params["victim"].norm == "group":
        prior = "none"
    attack["inversion"] = {**as_dict(params["inversion"]), "iterations": config.iterations, "seeds": config.seeds,
                           "bn_prior": prior}
    attack["labels"] = {**attack["labels"], "strategy": "counts", "posterior_steps": config.label_posterior_steps}
    return attack


@flow(name="gradinv-federation", log_prints=True)
def federation(params_path: str = "params.yaml", root: str = ".", engine: str | None = None) -> dict:
    """Returns {"rows": [...], "paths": files written, "mlflow_run_id": parent run id}; `engine`
    overrides federation.engine."""
    params = load_params(params_path)
    config = params["federation"] if engine is None else dataclasses.replace(params["federation"], engine=engine)
    root = str(Path(root).resolve())
    command = f"python -m flows.federation --params {params_path} --root {root}" + (f" --engine {engine}" if engine else "")
    name = run_name(f"federation {len(config.client_sizes)} clients × {config.rounds} rounds", params)
    with tracked_run(root, name, command, tags={"flower": config.engine}) as tracker:
        tracker.params({f"federation.{k}": v for k, v in as_dict(config).items()})
        victim_ready(root, {s: as_dict(params[s]) for s in ("data", "victim")}, tracker)
        fed.write_truths(config, root)
        cached = federation_done(root, fed.app_settings(config, root), config.engine)
        print(f"federation ({config.engine} engine): {'cached' if cached else 'done'}")
        records = fed.attacked_replies(config, root)
        attack = attack_settings(params)
        jobs = [{"recorded": r["folder"], "truth": str(fed.check_truth_matches(r, root)), "params": attack}
                for r in records]
        results = run_fan_out(root, jobs, params["batches"])
        rows = [fed.reply_row(record, result, config) for record, result in zip(records, results)]
        out = Path(root) / fed.FEDERATION
        table = fed.table(rows)
        plot = fed.save_plot(rows, out / "federation.png")
        findings = fed.findings(rows)
        paths = [write_table(out / "federation.parquet", table), plot,
                 write_json(out / "federation.json", {"rows": rows, "params": as_dict(config), "findings": findings}),
                 write_federation_html(out / "federation.html", table, plot, findings)]
        for row in rows:
            tracker.log_child(f"federation round {row['round']} client {row['client']}",
                              {k: row[k] for k in ("round", "client", "examples", "local_steps", "buffers_sent")},
                              {k: row[k] for k in fed.LEAKAGE if row[k] is not None})
        for path in paths:
            tracker.artifact(path, "federation")
        files = {"report": out / "federation.html", "table": out / "federation.parquet"}
        tracking = tracker.tracking(command)
        publish("gradinv-federation", "gradinv federation audit",
                {f"finding {i + 1}": line for i, line in enumerate(findings)}, files, tracking)
    return {"rows": rows, "paths": [str(p) for p in paths], "mlflow_run_id": tracker.run_id, "files": files,
            "tracking": tracking}


def describe(rows: list[dict]) -> str:
    lines = ["round  client  examples  steps  buffers  PSNR    SSIM   IIP    labels"]
    for r in rows:
        lines.append(f"{r['round']:5d}  {r['client']:6d}  {r['examples']:8d}  {r['local_steps']:5d}  "
                     f"{'yes' if r['buffers_sent'] else 'no':7s}  {r['psnr']:6.2f}  {r['ssim']:5.3f}  "
                     f"{r['iip']:5.2f}  {r['label_accuracy']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        try:
            import flwr  # noqa: F401 - said here, before any work starts
        except ImportError:
            raise UserError("the federation audit needs Flower: install the flower extra "
                            "(pip install -e '.[flower]').") from None
        result = federation(args.params, args.root, args.engine)
        return f"{describe(result['rows'])}\n" + "\n".join(fed.findings(result["rows"])) + \
            f"\n{where_to_look(result['files'], result['tracking'])}"

    def engine_argument(parser) -> None:
        parser.add_argument("--engine", choices=("simulation", "deployment"),
                            help="Flower's engine, instead of federation.engine (deployment: a SuperLink and one "
                                 "SuperNode per client on 127.0.0.1)")

    return run_flow_command("python -m flows.federation", __doc__, run, argv, engine_argument)


if __name__ == "__main__":
    sys.exit(main())
