"""How far the objective's image gradient moves when the step runs under half-precision autocast.

    python -m benchmarks.low_precision_check                  # CPU; about two minutes
    python -m benchmarks.low_precision_check --device cuda    # the same on a GPU (torch and torchvision only)

Half precision would halve what the step moves (benchmarks/step_roofline.py), but the inversion
follows the gradient of a distance between parameter gradients, differentiated twice. For a
random-weight ResNet-18 at 32 px (bs 4) and ResNet-50 at 224 px (bs 1), two seeds of random
images, this computes every loss term and the image gradient in float32 (seeds one by one,
PyTorch's BatchNorm, TF32 off: the reference), then along each path the engine offers (seeds one
by one or vmapped, either BatchNorm double backward) in float32 (how far the paths alone move
it), on CUDA with TF32 convolutions and matrix products (the engine's CUDA default,
`engine.tf32`; cuDNN's own default too), and under torch.autocast with bfloat16 and float16.
Per path: the relative difference of the gradient-distance term, and the cosine and relative
difference of the image gradient to the reference. A path that fails is recorded with its error.
Writes benchmarks/results/low_precision-<device>.json.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, argument_parser, command, machine, problem, write_result
from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine import attacker_model
from gradinv.engine.policy import tf32_matmuls
from gradinv.pipeline.config import build_section

PROBLEMS = [("resnet18", 10, 32, 4), ("resnet50", 1000, 224, 1)]  # (arch, classes, px, bs)
SEEDS = 2
PATHS = [("pytorch", False), ("explicit", False), ("pytorch", True), ("explicit", True)]  # (BN double backward, vmapped)
PRECISIONS = ("float32", "tf32", "bfloat16", "float16")  # tf32 on CUDA only: a CPU has none


def terms_and_image_gradient(model, artifact, labels, images, device, bn: str, vmapped: bool, precision: str):
    engine = build_section("engine", {"device": str(device), "bn_double_backward": bn})
    objective = Objective(attacker_model(train_mode_copy(model), engine, device, SEEDS), artifact, labels,
                          build_section("inversion", {"seeds": SEEDS}))
    x = images.clone().requires_grad_(True)
    half = torch.autocast(device.type, dtype=getattr(torch, precision)) if precision in ("bfloat16", "float16") else nullcontext()
    with tf32_matmuls(precision == "tf32"), half:
        if vmapped:
            terms = objective.batched_terms(x, x)
        else:
            per_seed = [objective.terms(seed) for seed in x]
            terms = {k: torch.stack([t[k] for t in per_seed]) for k in LOSS_TERMS}
    (gradient,) = torch.autograd.grad(terms["total"].float().sum(), x)
    return {k: v.detach().float() for k, v in terms.items()}, gradient


def precisions_on(device: torch.device) -> list[str]:
    return [p for p in PRECISIONS if p != "tf32" or device.type == "cuda"]


def compare(model, artifact, labels, images, device) -> list[dict]:
    reference_terms, reference = terms_and_image_gradient(model, artifact, labels, images, device, "pytorch", False, "float32")
    rows = []
    for precision in precisions_on(device):
        for bn, vmapped in PATHS:
            row = {"precision": precision, "bn_double_backward": bn, "seeds": "vmapped" if vmapped else "one by one"}
            try:
                terms, gradient = terms_and_image_gradient(model, artifact, labels, images, device, bn, vmapped, precision)
                row.update({
                    "gradient_term_relative_difference": ((terms["grad"] - reference_terms["grad"]).abs()
                                                          / reference_terms["grad"]).max().item(),
                    "image_gradient_cosine": F.cosine_similarity(gradient.flatten(), reference.flatten(), 0).item(),
                    "image_gradient_relative_difference": ((gradient - reference).norm() / reference.norm()).item()})
            except Exception as error:  # noqa: BLE001 - one failing path must not cost the others' figures
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("low_precision_check", __doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/low_precision-<device>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("low_precision_check: --device cuda, and torch sees no GPU.", file=sys.stderr)
        return 2
    results = []
    for arch, classes, px, batch in PROBLEMS:
        model, artifact, labels = problem(arch, classes, px, batch)
        images = torch.randn((SEEDS, batch, 3, px, px), generator=torch.Generator().manual_seed(1)).to(device)
        labels = torch.tensor(labels, device=device)
        print(f"{arch}, {px} px, bs {batch}", flush=True)
        results.append({"arch": arch, "px": px, "batch": batch, "seeds": SEEDS,
                        "rows": compare(model, artifact, labels, images, device)})
    write_result(Path(args.out or RESULTS / f"low_precision-{device.type}.json"),
                 {"machine": machine(device), "command": command("low_precision_check", sys.argv[1:] if argv is None else argv),
                  "problems": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
