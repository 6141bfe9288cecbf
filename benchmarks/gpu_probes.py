"""Would CUDA graphs or torch.compile speed up the inversion step? Probes on one seed's step.

    python benchmarks/gpu_probes.py          # on a CUDA machine; torch and torchvision only

- CUDA graph: one seed's whole step (forward, parameter gradients with create_graph, objective,
  gradient to the images, Adam with capturable state) captured once and replayed, against the
  same step run eagerly. The view is fixed (no jitter or flip: a graph replays fixed shapes and
  shifts), so this bounds what graphs could give.
- CUDA graph over batched seeds: the same for G 8 seeds in one vmapped call (the engine's
  `seed_batch`), the paper preset's bs 8 G 8 step.
- cuDNN autotuning: one seed's eager step with `torch.backends.cudnn.benchmark` off and on.
- profile: where one seed's eager step spends GPU time (torch.profiler, top operators).
- torch.compile: the attacker model's forward compiled (inductor), then one step; the step needs
  the gradient of a gradient (create_graph=True) through the compiled forward.

ResNet-50 at 224 px, TF32 on. Writes benchmarks/results/gpu_probes.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gradinv.client import train_mode_copy  # noqa: E402
from gradinv.config import build_section  # noqa: E402
from gradinv.objective import Objective  # noqa: E402
from step_speed import machine, problem  # noqa: E402

REPEATS = 20


def setup(batch: int, device: torch.device, seeds: int = 1):
    """One step of `seeds` seeds (seeds > 1: batched with vmap), Adam with capturable state."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, artifact, labels = problem("resnet50", 1000, 224, batch)
    config = build_section("inversion", {"seeds": seeds, "device": str(device), "registration": "none", "tf32": True})
    objective = Objective(train_mode_copy(model).to(device), artifact, torch.tensor(labels, device=device), config)
    shape = (batch, 3, 224, 224) if seeds == 1 else (seeds, batch, 3, 224, 224)
    x = torch.randn(shape, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.1, capturable=True)
    total = (lambda: objective.terms(x)["total"]) if seeds == 1 else (lambda: objective.batched_terms(x)["total"].sum())

    def step():
        (x.grad,) = torch.autograd.grad(total(), x)
        optimizer.step()

    return step


def timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / REPEATS


def graph_probe(batch: int, device: torch.device, seeds: int = 1) -> dict:
    torch.backends.cudnn.benchmark = True
    step = setup(batch, device, seeds)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    eager = timed(step, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = timed(graph.replay, device)
    return {"batch": batch, "seeds": seeds, "eager_s": eager, "graph_replay_s": replay, "speedup": eager / replay}


def graph_vmap_probe(batch: int, device: torch.device) -> dict:
    return graph_probe(batch, device, seeds=8)


def autotune_probe(batch: int, device: torch.device) -> dict:
    times = {}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        step = setup(batch, device)
        for _ in range(3):
            step()
        times[benchmark] = timed(step, device)
    return {"batch": batch, "eager_s": times[False], "autotuned_s": times[True], "speedup": times[False] / times[True]}


def profile_probe(batch: int, device: torch.device) -> dict:
    torch.backends.cudnn.benchmark = True
    step = setup(batch, device)
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    return {"batch": batch, "table": table}


def compile_probe(batch: int, device: torch.device) -> dict:
    step = setup(batch, device)
    eager = (step(), timed(step, device))[1]
    model, artifact, labels = problem("resnet50", 1000, 224, batch)
    config = build_section("inversion", {"seeds": 1, "device": str(device), "registration": "none", "tf32": True})
    compiled = train_mode_copy(model).to(device)
    compiled.forward = torch.compile(compiled.forward)  # the module keeps its layer names
    objective = Objective(compiled, artifact, torch.tensor(labels, device=device), config)
    x = torch.randn((batch, 3, 224, 224), device=device, requires_grad=True)
    start = time.perf_counter()
    torch.autograd.grad(objective.terms(x)["total"], x)
    first = time.perf_counter() - start
    seconds = timed(lambda: torch.autograd.grad(objective.terms(x)["total"], x), device)
    return {"batch": batch, "eager_s": eager, "compiled_s": seconds, "first_call_s": first, "speedup": eager / seconds}


def run_probe(name: str, batch: int, timeout: float) -> dict:
    """Each probe in its own process, with a time limit (compilation can take minutes)."""
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name, str(batch)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"probe": name, "batch": batch, "error": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return {"probe": name, "batch": batch, "error": (errors or lines or ["(no output)"])[-1][:500]}
    return {"probe": name, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_probes.json"))
    parser.add_argument("--compile-timeout", type=float, default=180)
    parser.add_argument("--only", nargs="*", help="probes to run (default: all)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of probes not run from an existing results file")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_probes: needs CUDA, and torch sees no GPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.one:
        probe = {"graph": graph_probe, "graph-vmap": graph_vmap_probe, "autotune": autotune_probe,
                 "profile": profile_probe, "compile": compile_probe}[args.one[0]]
        print(json.dumps(probe(int(args.one[1]), device)))
        return 0
    result = {"machine": machine(device), "command": "python benchmarks/gpu_probes.py", "rows": []}
    if args.merge and Path(args.out).is_file():
        kept = json.loads(Path(args.out).read_text())["rows"]
        result["rows"] = [r for r in kept if not args.only or r["probe"] not in args.only]
    for name, batch, timeout in (("graph", 1, 120), ("graph", 8, 120), ("graph-vmap", 8, 120), ("autotune", 8, 120),
                                 ("profile", 8, 120), ("compile", 8, args.compile_timeout)):
        if args.only and name not in args.only:
            continue
        row = run_probe(name, batch, timeout)
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
