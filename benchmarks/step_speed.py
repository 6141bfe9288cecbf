"""Speed of the inversion step: seconds per iteration, peak memory, FLOPs, achieved FLOP/s.

    python -m benchmarks.step_speed                # CPU suite: resnet18, 32 px, bs 8, G 1/4/8
    python -m benchmarks.step_speed --suite gpu    # GPU suite: ResNet-50, 224 px, bs 1/8/48, G 1/4/8
    python -m benchmarks.step_speed --suite gpu --resume     # only the configurations the results file lacks
    python -m benchmarks.step_speed --suite gpu --variants engine-default baseline --out F   # chosen variants only

Needs only torch and torchvision (and gradinv's own safetensors / pyarrow): no Prefect, DVC or
MLflow, no data and no weights (random weights; the step's cost does not depend on them). On a
CPU each configuration runs in a fresh subprocess, so that its peak RSS is its own; on CUDA they
run in one process (peak allocated memory is reset per configuration) and the results file is
rewritten after each, so that a run cut short keeps what it measured. Variants:

- `baseline`: the straightforward step, written out here: the objective as the paper states it
  on the model as the client runs it (torch's own layers), each layer's gradient distance
  spelled as it reads (`vector_norm(g - t)`) and it and the BN prior layer by layer,
  `loss.backward()` (parameter .grad filled too), strict float32, seeds one by one on all torch
  threads, glibc's malloc as it comes. It uses gradinv only for the problem (gradient, BN
  targets) and changes nothing in it.
  `baseline-keep-freed-memory`: the same after gradinv.engine.cpu_allocator.keep_freed_memory(),
  which every engine row has (`engine.keep_freed_memory`) but `-default-malloc`, to tell its
  share of the speed-up apart;
- `engine-<seeds>[-tf32][-bn-explicit][-default-malloc]`: gradinv's step as `invert` runs it,
  with the `engine` settings the name says: seeds `loop` (`seed_batch: 1, seed_workers: 1`),
  `auto` (`seed_batch: 0, seed_workers: 0`, invert's default for the device), `vmap` (all seeds
  in one vmapped call) or `vmapN` (chunks of N seeds); `tf32`, `bn_double_backward: explicit`
  (else `pytorch`) and `keep_freed_memory: false` as named; eager (`cuda_graph: false`:
  benchmarks/cuda_graph_check.py times graphed steps);
- `engine-default` (GPU suite): the engine with every setting as shipped (seed_batch,
  cuda_graph and bn_double_backward auto, TF32), timed from the difference of two run lengths
  so that the eager warm-up and the graph's capture stay out of it.

Seconds per iteration: one timed run of `iterations` after a warm-up, in `rounds` rounds (CPU:
3) that take the configurations of a batch size and seed count in turn, each in a fresh process;
a row is the median of its rounds, so that a slow spell of the machine falls on every variant
alike instead of deciding a row.
FLOPs come from torch.utils.flop_counter on one seed's step; the peak is the device's nominal
fp32 (or TF32) rate where known, else a measured large-GEMM rate (said so in the output).
Writes benchmarks/results/step_speed-<suite>.json (with the machine's description);
`python -m benchmarks.write_docs` turns it into docs/step_speed.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.common import REPO, RESULTS, argument_parser, command, machine, problem, sync, write_result
from gradinv.attack.inversion import attacker_objective, invert
from gradinv.attack.objective import Objective, layer_weight, total_variation
from gradinv.attack.views import draw_view
from gradinv.client.step import parameter_gradients, recorded_bn_statistics, train_mode_copy
from gradinv.engine.cpu_allocator import keep_freed_memory
from gradinv.pipeline.config import EngineConfig, build_section

# Nominal dense rates (FLOP/s): fp32 on CUDA cores, TF32 on tensor cores.
GPU_PEAKS = {"H100": (67e12, 495e12), "H200": (67e12, 495e12), "A100": (19.5e12, 156e12)}

SUITES = {
    "cpu": {"arch": "resnet18", "classes": 12, "px": 32, "iterations": 10, "rounds": 3},
    "gpu": {"arch": "resnet50", "classes": 1000, "px": 224, "iterations": 5, "rounds": 1},
}


def suite_configs(name: str) -> list[tuple[int, int, str]]:
    """(batch size, seeds, variant) in the order they run: on the GPU the paper preset's bs 8 and
    the bs 48 memory check first, so that a run cut short has measured what matters most."""
    if name == "cpu":
        return [(8, g, v) for g in (1, 4, 8)
                for v in ("baseline", "baseline-keep-freed-memory", "engine-loop", "engine-auto",
                          "engine-auto-default-malloc", "engine-auto-bn-explicit")]
    configs = []
    for batch in (8, 48, 1):
        for seeds in (8, 4, 1):
            configs += [(batch, seeds, v) for v in ("engine-loop", "engine-loop-tf32")]
            if seeds > 1:
                configs += [(batch, seeds, v) for v in ("engine-vmap", "engine-vmap-tf32")]
            if seeds == 8 and batch == 8:
                configs.append((batch, seeds, "engine-vmap-tf32-bn-explicit"))
            if seeds == 8 and batch == 48:
                configs += [(batch, seeds, v) for v in ("engine-vmap4-tf32", "engine-vmap2-tf32")]
            configs += [(batch, seeds, "engine-default"), (batch, seeds, "baseline")]
    return configs


def selected_configs(name: str, variants: list[str] | None) -> list[tuple[int, int, str]]:
    """suite_configs, only the named variants where some are named (unknown names refused)."""
    configs = suite_configs(name)
    if not variants:
        return configs
    unknown = sorted(set(variants) - {v for _, _, v in configs})
    if unknown:
        raise SystemExit(f"step_speed: no variant {', '.join(unknown)} in the {name} suite.")
    return [c for c in configs if c[2] in variants]


def rolled_view(config, generator: torch.Generator):
    """The straightforward view: torch.roll by the drawn shift, then a flip."""
    down, right, flip = draw_view(config, generator)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = torch.roll(x, shifts=(down, right), dims=(-2, -1))
        return x.flip(-1) if flip else x

    return view


def straightforward_layer_distance(grad: torch.Tensor, target: torch.Tensor, squared: bool) -> torch.Tensor:
    """‖grad − target‖₂ (or its square), spelled as it reads."""
    return torch.linalg.vector_norm(grad - target).pow(2 if squared else 1)


def straightforward_terms(objective: Objective, x: torch.Tensor, view) -> torch.Tensor:
    """The objective's total (no consensus) as the paper states it: the parameter gradients of the
    model's view of x, every layer's distance to the target on its own, TV, L2 and the BN prior
    layer by layer. `objective` supplies the problem only (model, labels, target, BN targets);
    the distances are this function's own (l2 or squared_l2)."""
    c = objective.config
    if c.gradient_distance not in ("l2", "squared_l2") or objective.mask is not None or objective.fedavg is not None:
        raise ValueError("the straightforward step spells the l2 distances against a plain gradient only")
    with recorded_bn_statistics(objective.model) as stats:
        grads = parameter_gradients(objective.model, view(x), objective.labels, create_graph=True)
    squared = c.gradient_distance == "squared_l2"
    grad = sum(layer_weight(n, c.layer_weights) * straightforward_layer_distance(grads[n], t, squared)
               for n, t in objective.target.items())
    bn = x.new_zeros(())
    for index, (name, (mean, var)) in enumerate(objective.bn_targets.items()):
        batch_mean, batch_var = stats[name]
        distance = torch.linalg.vector_norm(batch_mean - mean) + torch.linalg.vector_norm(batch_var - var)
        bn = bn + (c.first_bn_multiplier if index == 0 else 1.0) * distance
    return (c.alpha_grad * grad + c.alpha_tv * total_variation(x) + c.alpha_l2 * torch.linalg.vector_norm(x)
            + c.alpha_bn * bn)


def baseline_seconds(model, artifact, labels, config, device: torch.device, iterations: int) -> float:
    """The straightforward loop: torch's own layers, backward() into every leaf, seeds one after
    the other, every layer's distance on its own."""
    objective = Objective(train_mode_copy(model).to(device), artifact, torch.tensor(labels, device=device), config)
    shape = (artifact.batch_size, *artifact.meta["input_shape"])
    seeds = [torch.randn(shape, device=device, requires_grad=True) for _ in range(config.seeds)]
    optimizers = [torch.optim.Adam([x], lr=config.lr) for x in seeds]
    generator = torch.Generator().manual_seed(0)

    def step():
        for x, optimizer in zip(seeds, optimizers):
            optimizer.zero_grad(set_to_none=True)
            objective.model.zero_grad(set_to_none=True)
            straightforward_terms(objective, x, rolled_view(config, generator)).backward()
            optimizer.step()

    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync(device)
    return (time.perf_counter() - start) / iterations


def engine_settings(variant: str, seeds: int) -> dict:
    """The `engine` settings of an `engine-...` variant: eager steps (benchmarks/cuda_graph_check.py times graphed ones)."""
    mode = variant.split("-")[1]
    named = {"loop": 1, "auto": 0, "vmap": seeds}
    batch = named[mode] if mode in named else int(mode.removeprefix("vmap"))
    return {"seed_workers": 0 if mode == "auto" else 1, "seed_batch": batch, "tf32": "tf32" in variant,
            "bn_double_backward": "explicit" if "bn-explicit" in variant else "pytorch", "cuda_graph": False,
            "keep_freed_memory": not variant.endswith("-default-malloc")}


def engine_seconds(model, artifact, labels, config, engine: EngineConfig, iterations: int) -> float:
    invert(model, artifact, labels, dataclasses.replace(config, iterations=2), engine=engine)  # warm-up
    return invert(model, artifact, labels, config, engine=engine).seconds / iterations


def default_engine_seconds(model, artifact, labels, config, engine: EngineConfig, iterations: int) -> float:
    """Seconds per iteration as the difference of a run of 4 + `iterations` and one of 4 (after a
    warm-up run of 4): a graphed run's two eager iterations and its capture fall in both."""
    run = lambda n: invert(model, artifact, labels, dataclasses.replace(config, iterations=n), engine=engine)  # noqa: E731
    run(4)
    return (run(4 + iterations).seconds - run(4).seconds) / iterations


class FlopCount(TorchDispatchMode):
    """Sums torch.utils.flop_counter's per-operator formulas over every dispatched op.
    (FlopCounterMode itself tracks modules with backward hooks that autograd.grad to a leaf
    input rejects.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(model, artifact, labels, config, device) -> int:
    """FLOPs of one seed's step (forward, parameter gradients, gradient to the input), with the
    engine's layers as pytorch's BatchNorm runs them."""
    engine = build_section("engine", {"device": str(device), "bn_double_backward": "pytorch"})
    objective = attacker_objective(model, artifact, torch.tensor(labels, device=device), config, engine, device)
    x = torch.randn((artifact.batch_size, *artifact.meta["input_shape"]), device=device, requires_grad=True)
    with FlopCount() as counter:
        torch.autograd.grad(objective.terms(x)["total"], x)
    return counter.total


_FLOPS_PER_SEED: dict[tuple, int] = {}


def measure(spec: dict) -> dict:
    """One configuration, in this process."""
    device = torch.device(spec["device"])
    variant = spec["variant"]
    shipped = variant == "engine-default"
    tf32 = "tf32" in variant or (shipped and device.type == "cuda" and EngineConfig().tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    model, artifact, labels = problem(spec["arch"], spec["classes"], spec["px"], spec["batch"])
    config = build_section("inversion", {"iterations": spec["iterations"], "seeds": spec["seeds"],
                                         "checkpoint_every": 0, "log_every": 1000, "registration": "none"})
    engine = {"device": spec["device"]}  # the engine as shipped keeps every default
    if variant.startswith("engine-") and not shipped:
        engine.update(engine_settings(variant, spec["seeds"]))
    engine = build_section("engine", engine)
    rss_before = _max_rss_bytes()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if variant == "baseline-keep-freed-memory":
        keep_freed_memory()
    if variant.startswith("baseline"):
        seconds = baseline_seconds(model, artifact, labels, config, device, spec["iterations"])
    elif shipped:
        seconds = default_engine_seconds(model, artifact, labels, config, engine, spec["iterations"])
    else:
        seconds = engine_seconds(model, artifact, labels, config, engine, spec["iterations"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss_bytes()
    key = (spec["arch"], spec["px"], spec["batch"])
    if key not in _FLOPS_PER_SEED:  # the same for every variant
        _FLOPS_PER_SEED[key] = step_flops(model, artifact, labels, config, device)
    flops = spec["seeds"] * _FLOPS_PER_SEED[key]
    return {**spec, "tf32": tf32, "seconds_per_iteration": seconds, "flops_per_iteration": flops,
            "achieved_flops": flops / seconds, "peak_memory_bytes": peak,
            "memory_kind": "max allocated (CUDA)" if device.type == "cuda" else "process max RSS",
            "rss_before_run_bytes": rss_before, "torch_threads": torch.get_num_threads()}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_peak(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (fp32, tf32) in GPU_PEAKS.items():
            if key in name:
                return {"fp32": fp32, "tf32": tf32, "source": f"nominal dense rates of the {key}"}
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    a @ a
    sync(device)
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ a
    sync(device)
    rate = repeats * 2 * size ** 3 / (time.perf_counter() - start)
    return {"fp32": rate, "tf32": rate, "source": f"measured fp32 GEMM {size}x{size} on {torch.get_num_threads()} threads"}


def measure_in_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_speed", "--one", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {**spec, "error": (done.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_here(spec: dict) -> dict:
    try:
        return measure(spec)
    except torch.cuda.OutOfMemoryError:
        return {**spec, "error": "out of GPU memory"}
    except Exception as err:  # noqa: BLE001 - a failed configuration is a result too
        return {**spec, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    finally:
        torch.cuda.empty_cache()


def resumed_result(device: torch.device, out: Path) -> dict:
    """The results in `out`, to be completed on this machine: refused when they were measured on
    another kind of device, whose figures would not compare."""
    result = json.loads(out.read_text())
    here, there = machine(device), result["machine"]
    if (here.get("gpu"), here["cpu"]) != (there.get("gpu"), there["cpu"]):
        raise SystemExit(f"step_speed: {out} was measured on {there.get('gpu') or there['cpu']}, not on this machine "
                         f"({here.get('gpu') or here['cpu']}); rerun without --resume.")
    result["runs"] = result.get("runs", 1) + 1
    return result


def run_suite(name: str, device: torch.device, out: Path, resume: bool = False, variants: list[str] | None = None,
              argv: list[str] | None = None) -> dict:
    """Every configuration of the suite (of the named variants); with `resume`, only those missing from `out`."""
    suite = SUITES[name]
    result = resumed_result(device, out) if resume else {
        "suite": name, "machine": machine(device), "peak": device_peak(device), "rows": [],
        "command": command("step_speed", argv if argv is not None else ["--suite", name])}
    done = {(r["batch"], r["seeds"], r["variant"]) for r in result["rows"]}
    groups: dict[tuple[int, int], list[str]] = {}
    for batch, seeds, variant in selected_configs(name, variants):
        if (batch, seeds, variant) not in done:
            groups.setdefault((batch, seeds), []).append(variant)
    measure_one = measure_here if device.type == "cuda" else measure_in_subprocess
    for (batch, seeds), names in groups.items():
        specs = [{"suite": name, "device": str(device), "arch": suite["arch"], "classes": suite["classes"],
                  "px": suite["px"], "batch": batch, "seeds": seeds, "variant": variant, "iterations": suite["iterations"]}
                 for variant in names]
        for row in measured_in_rounds(specs, suite["rounds"], measure_one):
            result["rows"].append({**row, "run": result.get("runs", 1)})
            if "error" in row:
                print(f"{row['variant']:32s} bs {batch:2d} G {seeds}: failed ({row['error']})", flush=True)
            else:
                print(f"{row['variant']:32s} bs {batch:2d} G {seeds}: {row['seconds_per_iteration']:.4f} s/it, "
                      f"{row['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
        write_result(out, result)
    return result


def measured_in_rounds(specs: list[dict], rounds: int, measure_one) -> list[dict]:
    """Each spec measured `rounds` times, the specs in turn (round 1 of each, then round 2, ...);
    per spec the median time (every round's kept) and the largest peak memory."""
    runs: list[list[dict]] = [[] for _ in specs]
    for _ in range(rounds):
        for spec, spec_runs in zip(specs, runs):
            spec_runs.append(measure_one(spec))
    rows = []
    for spec_runs in runs:
        failed = [r for r in spec_runs if "error" in r]
        if failed:
            rows.append(failed[0])
            continue
        seconds = [r["seconds_per_iteration"] for r in spec_runs]
        row = {**spec_runs[0], "rounds": rounds, "seconds_per_iteration": statistics.median(seconds),
               "seconds_per_iteration_rounds": seconds, "peak_memory_bytes": max(r["peak_memory_bytes"] for r in spec_runs)}
        row["achieved_flops"] = row["flops_per_iteration"] / row["seconds_per_iteration"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("step_speed", __doc__)
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--device", default=None, help="default: cuda for the gpu suite, cpu otherwise")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/step_speed-<suite>.json)")
    parser.add_argument("--resume", action="store_true",
                        help="measure only the configurations missing from the results file (same kind of machine)")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: every variant of the suite)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step_speed: the gpu suite needs CUDA, and torch sees no GPU.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / f"step_speed-{args.suite}.json"
    run_suite(args.suite, device, out, args.resume and out.is_file(), args.variants,
              sys.argv[1:] if argv is None else argv)
    print(f"results: {out}\ndocs:    python -m benchmarks.write_docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
