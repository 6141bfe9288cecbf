"""Which reconstruction to report, measured over the batches of a many-batch run: how often each
rule picks the seed of the best true PSNR, what the pick and the consensus score, how the final
gradient distance relates to PSNR across the seeds, and the gradient term's share of the objective.

    python -m benchmarks.seed_choice data/batches --name current --out docs/results/seed_choice.json

Rules, as inversion.choose names them: `objective` (the lowest final objective), `gradient` (the
lowest final gradient distance) and `consensus` (the seed nearest the registered consensus, in
mean squared pixel difference). Where invert.json predates `final_objective`, each seed's final
objective is computed again from its saved images, the victim (--victim), the batch's gradient
and labels, as the attack computes it at its end (`objective_from` says which). Each run is
stored under its --name in the results file, beside the runs already there."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from benchmarks.common import argument_parser, command, machine, mean_std, write_result
from gradinv.attack.inversion import choose_seed, read_labels
from gradinv.attack.objective import Objective
from gradinv.attack.outputs import RECONSTRUCTION_FILE
from gradinv.client.artifacts import load_gradient
from gradinv.client.data import standardize
from gradinv.client.step import train_mode_copy
from gradinv.client.victim import load_victim
from gradinv.pipeline.config import build_section
from gradinv.provenance import code_version

RULES = ("objective", "gradient", "consensus")


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's ρ (no ties expected among float figures)."""
    rank = lambda v: torch.tensor(v, dtype=torch.float64).argsort().argsort().double()  # noqa: E731
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def recomputed_objective(folder: Path, invert: dict, seeds: torch.Tensor, victim_dir: Path) -> list[float]:
    """Each saved seed's objective without the group pull, on the unshifted view, under the run's
    own inversion settings (its weights as used)."""
    model, victim = load_victim(victim_dir)
    artifact = load_gradient(folder / "gradient", model)
    labels = torch.tensor(read_labels(folder / "labels", victim.num_classes))
    settings = {**invert["params"], "alpha_grad": invert.get("alpha_grad_used", invert["params"]["alpha_grad"])}
    objective = Objective(train_mode_copy(model), artifact, labels, build_section("inversion", settings))
    images = standardize(seeds, artifact.meta["mean"], artifact.meta["std"])
    return [float(objective.terms(x)["total"].detach()) for x in images]


def batch_figures(folder: Path, victim_dir: Path) -> dict:
    """One batch's seeds: true PSNR and SSIM, final gradient distance (relative), each rule's pick,
    the consensus's figures and the gradient term's share at the first and last logged iteration."""
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    invert = json.loads((folder / "invert" / "invert.json").read_text())
    recon = load_file(str(folder / "invert" / RECONSTRUCTION_FILE))
    psnr, ssim, iip = (metrics["per_seed"][key] for key in ("psnr", "ssim", "iip"))
    loss = pq.read_table(folder / "invert" / "loss.parquet").to_pylist()
    first, last = min(r["iteration"] for r in loss), max(r["iteration"] for r in loss)
    share = lambda it: statistics.mean(r["share_grad"] for r in loss if r["iteration"] == it)  # noqa: E731
    objective_from = "invert.json" if "final_objective" in invert else "recomputed from the saved seeds"
    objective = invert.get("final_objective") or recomputed_objective(folder, invert, recon["seeds"], victim_dir)
    picks = {rule: choose_seed(rule, invert["final_grad_loss"], objective, recon["seeds"], recon["consensus"])
             for rule in RULES}
    return {"folder": folder.name, "psnr": psnr, "ssim": ssim, "iip": iip,
            "final_grad_relative": invert["final_grad_relative"],
            "best_seed": max(range(len(psnr)), key=psnr.__getitem__), "picks": picks,
            "final_objective": objective, "objective_from": objective_from,
            "consensus_psnr": metrics["consensus"]["psnr"], "consensus_ssim": metrics["consensus"]["ssim"],
            "consensus_iip": metrics["consensus"]["iip"],
            "grad_share_first": share(first), "grad_share_last": share(last),
            "grad_psnr_rank_correlation": rank_correlation(invert["final_grad_loss"], psnr),
            "params": {k: invert["params"][k] for k in ("iterations", "seeds", "choose", "gradient_distance",
                                                        "grad_share", "alpha_group", "langevin") if k in invert["params"]}}


def summarise(batches: list[dict]) -> dict:
    summary = {"batches": len(batches),
               "best_seed_psnr": mean_std([max(b["psnr"]) for b in batches]),
               "consensus_reconstruction": {"psnr": mean_std([b["consensus_psnr"] for b in batches]),
                                            "ssim": mean_std([b["consensus_ssim"] for b in batches]),
                                            "iip": mean_std([b["consensus_iip"] for b in batches])},
               "grad_share_first": mean_std([b["grad_share_first"] for b in batches]),
               "grad_share_last": mean_std([b["grad_share_last"] for b in batches]),
               "grad_psnr_rank_correlation": mean_std([b["grad_psnr_rank_correlation"] for b in batches]),
               "final_grad_relative": mean_std([v for b in batches for v in b["final_grad_relative"]])}
    for rule in RULES:
        summary[f"{rule}_rule"] = {"picks_best": sum(b["picks"][rule] == b["best_seed"] for b in batches),
                         "psnr": mean_std([b["psnr"][b["picks"][rule]] for b in batches]),
                         "ssim": mean_std([b["ssim"][b["picks"][rule]] for b in batches]),
                         "iip": mean_std([b["iip"][b["picks"][rule]] for b in batches])}
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argument_parser("seed_choice", __doc__)
    parser.add_argument("run", type=Path, help="a many-batch output folder holding batch-NNN/")
    parser.add_argument("--name", required=True, help="the run's name in the results file")
    parser.add_argument("--out", type=Path, default=Path("docs/results/seed_choice.json"))
    parser.add_argument("--command", default="", help="the command that made the run, recorded beside it")
    parser.add_argument("--victim", type=Path, default=Path("data/victim"),
                        help="the run's victim, for runs whose invert.json lacks final_objective")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.run.glob("batch-*") if (p / "eval" / "metrics.json").is_file())
    if not folders:
        print(f"seed_choice: no evaluated batch-NNN folder in {args.run}.", file=sys.stderr)
        return 2
    batches = [batch_figures(folder, args.victim) for folder in folders]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.name] = {"summary": summarise(batches), "batches": batches, "run_command": args.command,
                          "command": command("seed_choice", [str(args.run), "--name", args.name, "--out", str(args.out)]),
                          "commit": code_version()["commit"],
                          "machine": machine(torch.device("cpu"))}
    write_result(args.out, results)
    print(json.dumps(results[args.name]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
