"""Checks on a GPU that a step out of memory under `engine.seed_batch: auto` is taken again with fewer seeds per call.

    python -m benchmarks.out_of_memory_check     # on a CUDA machine; torch and torchvision only; ~2 minutes

ResNet-50 at 224 px (random weights), bs 48, G 8, the defaults otherwise (graphed, TF32), with
auto made to put all 8 seeds into one vmapped call (gradinv.engine.policy.BATCHED_IMAGES raised to
384 images for the run: a check of the fallback, which no setting can provoke on a card that holds
one seed at a time): 4 seeds per call need about 68 GB with the written-out BatchNorm that auto takes
(benchmarks/step_memory.py; 69 GB measured on an H100), 8 seeds twice that: the
step must halve its chunks until they fit, say so, and go on; the run is then repeated twice with
`seed_batch` set by hand to the chunk it ended with. The retried first iteration must compute
what the run set by hand computes (iteration-0 totals within 1e-4), and the final images must
lie no further from the run set by hand than float noise takes its two repeats (at most twice
their distance, plus 1 % of how far the images moved: on CUDA two identical runs differ from
the first iterations on, see cuda_graph_check.py, while a lost iteration or seed update moves the
images by a quarter or more). Writes benchmarks/results/out_of_memory.json; exit 1 when the check fails.

`--simulate-images N --device cpu --arch resnet18 --px 32 --batch 4` runs the same check where
nothing runs out of memory: the seeds are planned as on CUDA (batched, auto) on the CPU, and a call
of more than N images raises CUDA's out-of-memory error before it computes anything (a smoke test
of the script).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
from contextlib import ExitStack, redirect_stderr
from unittest import mock

import torch

from benchmarks.common import RESULTS, argument_parser, command, machine, problem, write_result
from gradinv.attack import inversion
from gradinv.engine import SeedStep, policy
from gradinv.pipeline.config import build_section

SEEDS = 8
FEWER = re.compile(r"out of GPU memory with (\d+) seeds per batched call; (\d+) from now on")


def simulated_out_of_memory(most_images: int):
    """SeedStep._chunk_gradient raising CUDA's out-of-memory error for calls of more than `most_images` images."""
    compute = SeedStep._chunk_gradient

    def chunk_gradient(self, chunk, consensus):
        if (chunk.stop - chunk.start) * self.images.shape[1] > most_images:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return compute(self, chunk, consensus)

    return mock.patch.object(SeedStep, "_chunk_gradient", chunk_gradient)


def planned_as_on_cuda(device: torch.device):
    """gradinv.engine.plan_step as on CUDA (seeds batched by auto), on `device`, eager off CUDA."""
    plan_step = policy.plan_step

    def plan(engine, seeds, batch_size, fedavg):
        planned = plan_step(dataclasses.replace(engine, device="cuda"), seeds, batch_size, fedavg)
        return dataclasses.replace(planned, device=device, graphed=planned.graphed and device.type == "cuda")

    return mock.patch.object(inversion, "plan_step", plan)


def run(model, artifact, labels, settings: dict, engine: dict, simulate: int | None) -> tuple[object, str]:
    """An inversion whose auto seed_batch puts every seed into one call (resolved as on CUDA, on
    any device), and what it wrote to stderr."""
    device = torch.device(engine["device"])
    stderr = io.StringIO()
    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(policy, "BATCHED_IMAGES", SEEDS * artifact.batch_size))
        if device.type != "cuda":
            patches.enter_context(planned_as_on_cuda(device))
        if simulate is not None:
            patches.enter_context(simulated_out_of_memory(simulate))
        patches.enter_context(redirect_stderr(stderr))
        result = inversion.invert(model, artifact, labels, build_section("inversion", settings),
                                  engine=build_section("engine", engine))
    return result, stderr.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("out_of_memory_check", __doc__)
    parser.add_argument("--out", default=str(RESULTS / "out_of_memory.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=4, help="2 eager, then captured and replayed")
    parser.add_argument("--simulate-images", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("out_of_memory_check: needs CUDA (or --simulate-images N --device cpu), and torch sees no GPU.",
              file=sys.stderr)
        return 2
    classes = 1000 if args.arch == "resnet50" else 10
    model, artifact, labels = problem(args.arch, classes, args.px, args.batch)
    settings = {"iterations": args.iterations, "seeds": SEEDS, "registration": "none", "checkpoint_every": 0, "log_every": 1}
    engine = {"device": args.device}
    auto, warnings = run(model, artifact, labels, settings, engine, args.simulate_images)
    halvings = [(int(before), int(after)) for before, after in FEWER.findall(warnings)]
    ended_with = halvings[-1][1] if halvings else SEEDS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    by_hand, _ = run(model, artifact, labels, settings, {**engine, "seed_batch": ended_with}, args.simulate_images)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    repeated, _ = run(model, artifact, labels, settings, {**engine, "seed_batch": ended_with}, args.simulate_images)
    moved = (by_hand.images - by_hand.initial).norm().item()
    apart = (auto.images - by_hand.images).norm().item() / moved
    noise = (repeated.images - by_hand.images).norm().item() / moved
    first = lambda result: [row["total"] for row in result.log if row["iteration"] == 0]  # noqa: E731
    first_apart = max(abs(a - b) / abs(b) for a, b in zip(first(auto), first(by_hand), strict=True))
    result = {"machine": machine(device), "command": command("out_of_memory_check", sys.argv[1:] if argv is None else argv),
              "arch": args.arch, "px": args.px, "batch": args.batch, "seeds": SEEDS, "iterations": args.iterations,
              "simulated_most_images": args.simulate_images, "halvings": halvings, "seeds_per_call_at_the_end": ended_with,
              "peak_memory_bytes_set_by_hand": peak, "iteration0_totals_max_rel_diff": first_apart,
              "images_apart_relative_to_their_movement": apart, "float_noise_two_runs_set_by_hand": noise,
              "warnings": warnings.strip().splitlines()}
    result["passed"] = bool(halvings) and ended_with < SEEDS and first_apart < 1e-4 and apart <= 2 * noise + 0.01
    write_result(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
