"""Which reconstruction to report, measured over the batches of a many-batch run: how often each
rule picks the seed of the best true PSNR, what the pick and the consensus score, how the final
gradient distance relates to PSNR across the seeds, and the gradient term's share of the objective.

    python -m benchmarks.seed_choice data/batches --name current --out docs/results/seed_choice.json

Rules: `gradient` (the lowest final gradient distance) and `consensus` (the seed nearest the
registered consensus, in mean squared pixel difference), as inversion.choose names them. Each
run is stored under its --name in the results file, beside the runs already there."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from benchmarks.common import command, machine, write_result
from gradinv.attack.inversion import choose_seed
from gradinv.attack.outputs import RECONSTRUCTION_FILE
from gradinv.provenance import code_version

RULES = ("gradient", "consensus")


def rank_correlation(x: list[float], y: list[float]) -> float:
    """Spearman's ρ (no ties expected among float figures)."""
    rank = lambda v: torch.tensor(v, dtype=torch.float64).argsort().argsort().double()  # noqa: E731
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def batch_figures(folder: Path) -> dict:
    """One batch's seeds: true PSNR and SSIM, final gradient distance (relative), each rule's pick,
    the consensus's figures and the gradient term's share at the first and last logged iteration."""
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    invert = json.loads((folder / "invert" / "invert.json").read_text())
    recon = load_file(str(folder / "invert" / RECONSTRUCTION_FILE))
    psnr, ssim = metrics["per_seed"]["psnr"], metrics["per_seed"]["ssim"]
    loss = pq.read_table(folder / "invert" / "loss.parquet").to_pylist()
    first, last = min(r["iteration"] for r in loss), max(r["iteration"] for r in loss)
    share = lambda it: statistics.mean(r["share_grad"] for r in loss if r["iteration"] == it)  # noqa: E731
    picks = {rule: choose_seed(rule, invert["final_grad_loss"], recon["seeds"], recon["consensus"]) for rule in RULES}
    return {"folder": folder.name, "psnr": psnr, "ssim": ssim, "final_grad_relative": invert["final_grad_relative"],
            "best_seed": max(range(len(psnr)), key=psnr.__getitem__), "picks": picks,
            "consensus_psnr": metrics["consensus"]["psnr"], "consensus_ssim": metrics["consensus"]["ssim"],
            "grad_share_first": share(first), "grad_share_last": share(last),
            "grad_psnr_rank_correlation": rank_correlation(invert["final_grad_loss"], psnr),
            "params": {k: invert["params"][k] for k in ("iterations", "seeds", "choose", "gradient_distance",
                                                        "grad_share", "alpha_group", "langevin") if k in invert["params"]}}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(batches: list[dict]) -> dict:
    summary = {"batches": len(batches),
               "best_seed_psnr": _mean_std([max(b["psnr"]) for b in batches]),
               "consensus_reconstruction": {"psnr": _mean_std([b["consensus_psnr"] for b in batches]),
                                            "ssim": _mean_std([b["consensus_ssim"] for b in batches])},
               "grad_share_first": _mean_std([b["grad_share_first"] for b in batches]),
               "grad_share_last": _mean_std([b["grad_share_last"] for b in batches]),
               "grad_psnr_rank_correlation": _mean_std([b["grad_psnr_rank_correlation"] for b in batches]),
               "final_grad_relative": _mean_std([v for b in batches for v in b["final_grad_relative"]])}
    for rule in RULES:
        summary[f"{rule}_rule"] = {"picks_best": sum(b["picks"][rule] == b["best_seed"] for b in batches),
                         "psnr": _mean_std([b["psnr"][b["picks"][rule]] for b in batches]),
                         "ssim": _mean_std([b["ssim"][b["picks"][rule]] for b in batches])}
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_choice", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a many-batch output folder holding batch-NNN/")
    parser.add_argument("--name", required=True, help="the run's name in the results file")
    parser.add_argument("--out", type=Path, default=Path("docs/results/seed_choice.json"))
    parser.add_argument("--command", default="", help="the command that made the run, recorded beside it")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.run.glob("batch-*") if (p / "eval" / "metrics.json").is_file())
    if not folders:
        print(f"seed_choice: no evaluated batch-NNN folder in {args.run}.", file=sys.stderr)
        return 2
    batches = [batch_figures(folder) for folder in folders]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.name] = {"summary": summarise(batches), "batches": batches, "run_command": args.command,
                          "command": command("seed_choice", [str(args.run), "--name", args.name]), "commit": code_version()["commit"],
                          "machine": machine(torch.device("cpu"))}
    write_result(args.out, results)
    print(json.dumps(results[args.name]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
