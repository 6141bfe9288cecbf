"""Does TF32, half precision (or batching the seeds) change what the attack recovers? Measured on the pipeline.

    python -m benchmarks.tf32_quality            # on a CUDA machine; needs torch, torchvision, pyyaml,
                                                 # safetensors, pyarrow, scikit-image, matplotlib (no Prefect/DVC/MLflow)
    python -m benchmarks.tf32_quality --iterations 400 --settings "fp32, seeds batched" "bfloat16, seeds batched" \
        --out benchmarks/results/precision_quality-cpu.json     # half precision on a CPU (float16 is emulated there)

Runs prepare → train → capture → labels once from params.yaml (default: the embedded photos),
then invert → evaluate once per setting below (`engine` overrides) on that same gradient, each in
its own copy of data/. Writes benchmarks/results/tf32_quality.json: per setting the chosen seed's and the
consensus's PSNR / SSIM, the final gradient distances and seconds per iteration, with the machine;
a setting whose run stops (a half-precision objective that turns non-finite) is recorded with its
error, and the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS, argument_parser, command, write_result
from gradinv.errors import UserError
from gradinv.io import read_json
from gradinv.pipeline.config import load_params
from gradinv.pipeline.stages import EVAL, INVERT, STAGES

SETTINGS = {  # name -> engine overrides
    "fp32, seeds one by one": {"tf32": False, "seed_batch": 1},
    "fp32, seeds batched": {"tf32": False, "seed_batch": 0},
    "tf32, seeds batched": {"tf32": True, "seed_batch": 0},
    "bfloat16, seeds batched": {"tf32": False, "seed_batch": 0, "precision": "bfloat16"},
    "float16, seeds batched": {"tf32": False, "seed_batch": 0, "precision": "float16"},
}
SHARED_STAGES = ("prepare", "train", "capture", "labels")


def run_stage(name: str, params: dict, root: Path) -> None:
    stage = STAGES[name]
    stage.run(params[stage.section], root, None, params["engine"])


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("tf32_quality", __doc__)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--work", default="/tmp/tf32_quality", help="scratch folder for the runs' data/")
    parser.add_argument("--out", default=str(RESULTS / "tf32_quality.json"))
    parser.add_argument("--iterations", type=int, help="inversion iterations (default: params.yaml's)")
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.iterations:
        params["inversion"] = dataclasses.replace(params["inversion"], iterations=args.iterations)
    base = Path(args.work) / "shared"
    shutil.rmtree(args.work, ignore_errors=True)
    for name in SHARED_STAGES:
        print(f"# {name}", flush=True)
        run_stage(name, params, base)
    results = {}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for setting in args.settings or SETTINGS:
        overrides = SETTINGS[setting]
        root = Path(args.work) / setting.replace(", ", "-").replace(" ", "_")
        shutil.copytree(base, root)  # the same gradient and labels for every setting
        run = {**params, "engine": dataclasses.replace(params["engine"], **overrides)}
        try:
            for name in ("invert", "evaluate"):
                run_stage(name, run, root)
        except UserError as error:
            results[setting] = {"overrides": overrides, "error": str(error)}
        else:
            metrics, invert = read_json(root / EVAL / "metrics.json", "metrics"), read_json(root / INVERT / "invert.json", "summary")
            results[setting] = {"overrides": overrides, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
                                "consensus_psnr": metrics["consensus"]["psnr"], "psnr_initial_noise": metrics["psnr_initial_noise"],
                                "final_grad_loss": invert["final_grad_loss"], "seconds_per_iteration": invert["seconds_per_iteration"]}
        print(setting, json.dumps(results[setting]), flush=True)
        out = {"machine": {"device": device, "torch": torch.__version__, "platform": platform.platform()},
               "params": args.params, "iterations": params["inversion"].iterations,
               "seeds": params["inversion"].seeds, "results": results,
               "command": command("tf32_quality", sys.argv[1:] if argv is None else argv)}
        write_result(args.out, out)  # after each setting: a run cut short keeps its results
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
