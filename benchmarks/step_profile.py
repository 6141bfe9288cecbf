"""Where one eager inversion step spends its GPU time: the kernels of a few steps, by total time.

    python -m benchmarks.step_profile                 # CUDA machine; torch and torchvision only
    python -m benchmarks.step_profile --device cpu --arch resnet18 --px 32   # the same table on a CPU

ResNet-50 at 224 px (random weights), bs 8, G 8 seeds batched, TF32 on; the step as configured by
--bn-double-backward and --conv-double-backward (the `engine` settings; default: as CUDA runs it
by default, explicit BN, seeds under vmap, torch's convolutions), eager: the graphed step runs
the same kernels without launch gaps, so the table says
which kernels a faster step must cut. Only the steps are profiled (the engine's SeedStep, after two
warm-up steps), not the inversion's set-up or its final per-seed evaluation.
Writes benchmarks/results/step_profile-<device>.json: the machine, the settings, the top
kernels (name, calls, total and mean time per step, share of the kernel time) and the top aten
operators by their input shapes and the time of what they run themselves (on CUDA the kernels
they launch): which convolution a costly kernel serves.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RESULTS, argument_parser, command, machine, problem, write_result
from gradinv.attack.inversion import attacker_objective, pixel_box
from gradinv.engine import SeedStep, plan_step
from gradinv.engine.policy import tf32_matmuls
from gradinv.pipeline.config import build_section


def kernel_table(prof, device: str, steps: int, top: int) -> list[dict]:
    """The `top` kernels (CUDA) or operators (CPU) by their own time, per step."""
    kernel = lambda e: e.device_type != torch.autograd.DeviceType.CPU  # noqa: E731 - operators would count their kernels twice
    own = (lambda e: e.self_device_time_total if kernel(e) else 0) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if own(e) > 0]
    total = sum(own(e) for e in events)
    events.sort(key=own, reverse=True)
    return [{"name": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": own(e) / 1e3 / steps,
             "share": own(e) / total} for e in events[:top]]


def operator_table(prof, device: str, steps: int, top: int) -> list[dict]:
    """The `top` aten operators, grouped by input shapes, by the kernels they launch themselves
    (CUDA) or their own CPU time (CPU), per step."""
    own = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)  # noqa: E731
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::") and own(e) > 0]
    total = sum(own(e) for e in events)
    events.sort(key=own, reverse=True)
    return [{"name": e.key, "input_shapes": str(e.input_shapes)[:400], "calls_per_step": e.count / steps,
             "ms_per_step": own(e) / 1e3 / steps, "share": own(e) / total} for e in events[:top]]


def profiled_steps(model, artifact, labels: list[int], config, engine, steps: int):
    """(profile, seconds per step) of `steps` steps of all seeds as `invert` takes them eagerly (chunks
    of engine.seed_batch seeds), after two warm-up steps (cuDNN and the allocator), and nothing else."""
    plan = plan_step(engine, config.seeds, artifact.batch_size, fedavg=False)
    device = plan.device
    objective = attacker_objective(model, artifact, torch.tensor(labels, device=device), config, engine, device)
    start = torch.randn((config.seeds, artifact.batch_size, *artifact.meta["input_shape"]),
                        generator=torch.Generator().manual_seed(config.seed))
    step = SeedStep([objective] * config.seeds, start.to(device), config, engine,
                    pixel_box(artifact.meta["mean"], artifact.meta["std"], device), plan)
    one_by_one = lambda fn, seeds: [fn(g) for g in seeds]  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def take() -> None:
        step.fill(config.lr, [(0, 0, False)] * config.seeds)
        step.step(False, one_by_one)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tf32_matmuls(engine.tf32):
        take(), take()
        sync()
        with profile(activities=activities, record_shapes=True) as prof:
            began = time.perf_counter()
            for _ in range(steps):
                take()
            sync()
            seconds = time.perf_counter() - began
    return prof, seconds / steps


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("step_profile", __doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--bn-double-backward", default="explicit", choices=["pytorch", "explicit"])
    parser.add_argument("--conv-double-backward", default="pytorch", choices=["pytorch", "explicit", "explicit-grouped"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("step_profile: --device cuda, and torch sees no GPU.", file=sys.stderr)
        return 2
    model, artifact, labels = problem(args.arch, 1000 if args.arch == "resnet50" else 10, args.px, args.batch)
    config = build_section("inversion", {"seeds": args.seeds})
    engine = build_section("engine", {"device": args.device, "seed_batch": args.seeds, "tf32": True, "cuda_graph": False,
                                      "bn_double_backward": args.bn_double_backward,
                                      "conv_double_backward": args.conv_double_backward})
    prof, seconds_per_step = profiled_steps(model, artifact, labels, config, engine, args.steps)
    rows = kernel_table(prof, args.device, args.steps, args.top)
    operators = operator_table(prof, args.device, args.steps, args.top)
    recorded = {"events": len(prof.events()),
                "device_events": sum(e.device_type != torch.autograd.DeviceType.CPU for e in prof.events())}
    if not rows:
        print(f"step_profile: the profiler recorded no {args.device} time ({recorded}).", file=sys.stderr)
    report = {"machine": machine(torch.device(args.device)), "command": command("step_profile", sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "top")},
              "seconds_per_step_profiled": seconds_per_step, "recorded": recorded, "kernels": rows,
              "operators": operators}
    write_result(Path(args.out) if args.out else RESULTS / f"step_profile-{args.device}.json", report)
    for r in rows:
        print(f"{r['ms_per_step']:9.2f} ms {r['share']:6.1%} {r['calls_per_step']:6.0f}x  {r['name']}")
    print("operators by input shapes:")
    for r in operators:
        print(f"{r['ms_per_step']:9.2f} ms {r['share']:6.1%} {r['calls_per_step']:6.0f}x  {r['name']} {r['input_shapes'][:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
