"""Defense audit: every defense of `audit` in params.yaml over its strength grid, attacked with
the same budget and seeds, leakage and utility in one table and one plot per defense.

    python -m flows.audit
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from prefect import flow

from flows.command import run_flow_command
from flows.fan_out import run_fan_out, victim_ready
from gradinv.client.defenses import modelled_by_attack
from gradinv.errors import UserError
from gradinv.evaluation.report import write_audit_html
from gradinv.io import write_json, write_table
from gradinv.pipeline.audit import (AUDIT, GRADIENT_ONLY_LEAKAGE, LEAKAGE, at_budget, audit_points, defense_findings,
                                    save_defense_plot)
from gradinv.pipeline.config import as_dict, load_params
from tasks.batches import attack_params
from tasks.publishing import publish, where_to_look
from tasks.tracking import run_name, tracked_run

FIGURES = (*LEAKAGE, "psnr_initial_noise", "consensus_psnr", *GRADIENT_ONLY_LEAKAGE, "utility_cosine",
           "utility_relative_error")
COLUMNS = ("defense", "strength", "attack", *FIGURES, "labels_warned", "folder")


def _slug(point: dict) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", f"{point['defense']}-{point['strength']}")


@flow(name="gradinv-audit", log_prints=True)
def audit(params_path: str = "params.yaml", root: str = ".", preset: str | None = None) -> dict:
    """Returns {"rows": [...], "paths": files written, "mlflow_run_id": parent run id}."""
    params = load_params(params_path, preset)
    config = params["audit"]
    points = audit_points(config)
    check_victim_for(points, params)
    root = str(Path(root).resolve())
    attack_budget = at_budget(params["inversion"], config.iterations, config.seeds)
    command = f"python -m flows.audit --params {params_path} --root {root}" + (f" --preset {preset}" if preset else "")
    defenses = [d for d in dict.fromkeys(p["defense"] for p in points) if d != "none"]
    name = run_name(f"audit {'+'.join(defenses)}", {**params, "inversion": attack_budget})
    with tracked_run(root, name, command, tags={"defenses": ",".join(defenses)}) as tracker:
        tracker.params({f"audit.{k}": v for k, v in as_dict(config).items()})
        victim_ready(root, {s: as_dict(params[s]) for s in ("data", "victim")}, tracker)
        jobs = []
        for i, point in enumerate(points):
            attack = attack_params(params)
            attack["inversion"] = as_dict(attack_budget)
            capture = dataclasses.replace(params["capture"], defenses=point["defenses"],
                                          aggregation_clients=point["aggregation_clients"])
            if point["defense"] == "fedavg":  # no single batch's BN statistics exist to leak
                capture = dataclasses.replace(capture, bn_leak="none")
                if attack_budget.bn_prior == "exact":
                    attack["inversion"] = {**attack["inversion"], "bn_prior": "approx"}
            attack["capture"] = as_dict(capture)
            jobs.append({"out": f"{AUDIT}/{i:02d}-{_slug(point)}", "index": 0, "params": attack})
        results = run_fan_out(root, jobs, params["batches"])
        rows = [_row(point, result) for point, result in zip(points, results)]
        out = Path(root) / AUDIT
        table = {key: [r[key] if key != "strength" else str(r[key]) for r in rows] for key in COLUMNS}
        plots = [save_defense_plot(rows, defense, out / f"{defense}.png")
                 for defense in dict.fromkeys(r["defense"] for r in rows) if defense != "none"]
        paths = [write_table(out / "audit.parquet", table), *plots,
                 write_json(out / "audit.json", {"rows": rows, "params": as_dict(config),
                                                 "attack_budget": {"iterations": config.iterations, "seeds": config.seeds}}),
                 write_audit_html(out / "audit.html", table, plots, defense_findings(rows))]
        for row in rows:
            tracker.log_child(f"audit {row['defense']} {row['strength']}",
                              {"defense": row["defense"], "strength": row["strength"]},
                              {k: row[k] for k in (*LEAKAGE, "utility_cosine", "utility_relative_error")})
        for path in paths:
            tracker.artifact(path, "audit")
        files = {"report": out / "audit.html", "table": out / "audit.parquet"}
        tracking = tracker.tracking(command)
        publish("gradinv-audit", f"gradinv defense audit: {', '.join(defenses)}",
                {f"finding {i + 1}": line for i, line in enumerate(defense_findings(rows))}, files, tracking)
    return {"rows": rows, "paths": [str(p) for p in paths], "mlflow_run_id": tracker.run_id,
            "files": files, "tracking": tracking}


def check_victim_for(points: list[dict], params: dict) -> None:
    """DP-SGD needs samples that do not see each other: a GroupNorm victim, which leaks no batch
    statistics and gives the BN prior nothing to match. Said before any work starts."""
    group = params["victim"].norm == "group"
    if any(p["defense"] == "dp_sgd" for p in points) and not group:
        raise UserError("params: 'audit.dp_epsilons' needs a victim without BatchNorm: set victim.norm: group "
                        "(the `dp` preset does: python -m flows.audit --preset dp), or leave audit.dp_epsilons empty.")
    if group and (params["capture"].bn_leak != "none" or params["inversion"].bn_prior != "none"):
        raise UserError("params: a GroupNorm victim (victim.norm: group) has no batch statistics to leak or match: "
                        "set capture.bn_leak: none and inversion.bn_prior: none.")


def _row(point: dict, result: dict) -> dict:
    import json

    labels = json.loads((Path(result["folder"]) / "labels" / "labels.json").read_text())
    aware = [d["kind"] for d in point["defenses"] if modelled_by_attack(d)]
    return {"defense": point["defense"], "strength": point["strength"],
            "attack": "aware of " + ", ".join(aware) if aware else "plain",
            **{k: result.get(k) for k in (*FIGURES, "folder")},
            "labels_warned": bool(labels.get("assumption_warnings"))}


def describe(rows: list[dict]) -> str:
    lines = ["defense             strength   PSNR    SSIM   IIP    labels  cosine  PSNR, gradient alone"]
    for r in rows:
        alone = "" if r.get("gradient_only_psnr") is None else f"{r['gradient_only_psnr']:6.2f}"
        lines.append(f"{r['defense']:18s} {str(r['strength']):>9s} {r['psnr']:6.2f} {r['ssim']:6.3f} "
                     f"{r['iip']:5.2f} {r['label_accuracy']:6.2f} {r['utility_cosine']:7.3f}  {alone}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> str:
        result = audit(args.params, args.root, args.preset)
        return f"{describe(result['rows'])}\n{where_to_look(result['files'], result['tracking'])}"

    def preset_argument(parser) -> None:
        parser.add_argument("--preset", help="use this entry of `presets` instead of the file's `preset` (e.g. dp)")

    return run_flow_command("python -m flows.audit", __doc__, run, argv, preset_argument)

if __name__ == "__main__":
    sys.exit(main())
