"""Speed of the inversion step: seconds per iteration, peak memory, FLOPs, achieved FLOP/s.

    .venv/bin/python benchmarks/step_speed.py                # CPU suite: resnet18, 32 px, bs 8, G 1/4/8
    python benchmarks/step_speed.py --suite gpu              # GPU suite: ResNet-50, 224 px, bs 1/8/48, G 1/4/8
    python benchmarks/step_speed.py --suite gpu --resume     # only the configurations the results file lacks
    python benchmarks/step_speed.py --suite gpu --variants engine-default baseline --out F   # chosen variants only

Needs only torch and torchvision (and gradinv's own safetensors / pyarrow): no Prefect, DVC or
MLflow, no data and no weights (random weights; the step's cost does not depend on them). On a
CPU each configuration runs in a fresh subprocess, so that its peak RSS is its own; on CUDA they
run in one process (peak allocated memory is reset per configuration) and the results file is
rewritten after each, so that a run cut short keeps what it measured. Variants:

- `baseline`: the straightforward step: `loss.backward()` (parameter .grad filled too), strict
  float32, torch's own layers (not gradinv.relu's), the gradient distance spelled as it reads
  (`vector_norm(g - t)`) and it and the BN prior layer by layer, seeds one by one on all torch threads, glibc's malloc as it comes;
  `baseline-keep-freed-memory` the same with gradinv.cpu_allocator's setting, which every
  engine row has (`inversion.keep_freed_memory`) but `-default-malloc`, to tell its share of the
  speed-up apart;
- `engine-<seeds>[-tf32][-channels-last][-bn-explicit][-stacked][-default-malloc]`: gradinv's
  step as `invert` runs it (gradients to the input only), seeds `loop` (one by one), `auto`
  (invert's default for the device), `vmap` (all seeds in one vmapped call) or `vmapN` (chunks
  of N seeds); TF32 (`inversion.tf32`), channels_last, `inversion.bn_double_backward: explicit`,
  `inversion.batched_seeds: stacked` and `inversion.keep_freed_memory: false` as named;
- `engine-default` (GPU suite): the engine with every setting as shipped (seed_batch,
  cuda_graph and bn_double_backward auto, TF32), timed from the difference of two run lengths
  so that the eager warm-up and the graph's capture stay out of it.

Seconds per iteration: one timed run of `iterations` after a warm-up, in `rounds` rounds (CPU:
3) that take the configurations of a batch size and seed count in turn, each in a fresh process;
a row is the median of its rounds, so that a slow spell of the machine falls on every variant
alike instead of deciding a row.
FLOPs come from torch.utils.flop_counter on one seed's step; the peak is the device's nominal
fp32 (or TF32) rate where known, else a measured large-GEMM rate (said so in the output).
Writes benchmarks/results/step_speed-<suite>.json (with the machine's description) and
docs/step_speed.md (one table per suite found in the results).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradinv import objective as objective_module  # noqa: E402
from gradinv.capture import client_update  # noqa: E402
from gradinv.client import train_mode_copy  # noqa: E402
from gradinv.config import build_section  # noqa: E402
from gradinv.cpu_allocator import keep_freed_memory  # noqa: E402
from gradinv.inversion import invert  # noqa: E402
from gradinv.models import build_model  # noqa: E402
from gradinv.objective import Objective  # noqa: E402
from gradinv.views import draw_view  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "step_speed.md"
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
                          "engine-auto-default-malloc", "engine-auto-channels-last", "engine-auto-bn-explicit")]
    configs = []
    for batch in (8, 48, 1):
        for seeds in (8, 4, 1):
            configs += [(batch, seeds, v) for v in ("engine-loop", "engine-loop-tf32")]
            if seeds > 1:
                configs += [(batch, seeds, v) for v in ("engine-vmap", "engine-vmap-tf32")]
            if seeds == 8 and batch > 1:
                configs.append((batch, seeds, "engine-loop-tf32-channels-last"))
            if seeds == 8 and batch == 8:
                configs += [(batch, seeds, v) for v in ("engine-vmap-tf32-bn-explicit", "engine-vmap-tf32-stacked",
                                                        "engine-vmap-tf32-bn-explicit-stacked",
                                                        "engine-vmap-tf32-channels-last-bn-explicit-stacked")]
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


@functools.cache
def problem(arch: str, classes: int, px: int, batch: int):
    """A random-weight model, one client's gradient artifact for a random batch, its labels
    (on the CPU; cached, as every variant of a batch size shares them)."""
    torch.manual_seed(0)
    model = build_model(arch, classes).eval()
    images = torch.randn(batch, 3, px, px)
    labels = torch.randperm(classes)[:batch] if batch <= classes else torch.randint(classes, (batch,))
    meta = {"arch": arch, "num_classes": classes, "input_shape": [3, px, px], "mean": [0.5] * 3, "std": [0.25] * 3}
    artifact = client_update(model, images, labels, "exact", meta)
    return model, artifact, labels.tolist()


def rolled_view(config, generator: torch.Generator):
    """The straightforward view: torch.roll by the drawn shift, then a flip."""
    down, right, flip = draw_view(config, generator)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = torch.roll(x, shifts=(down, right), dims=(-2, -1))
        return x.flip(-1) if flip else x

    return view


def straightforward_layer_distance(grad: torch.Tensor, target: torch.Tensor, squared: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(grad - target).pow(2 if squared else 1)


_LIBRARY_GRADIENT_DISTANCE = objective_module.gradient_distance


def straightforward_gradient_distance(grads, target, kind: str, weights) -> torch.Tensor:
    """The gradient distance layer by layer, each norm spelled as it reads (cosine: the library's)."""
    if kind == "cosine":
        return _LIBRARY_GRADIENT_DISTANCE(grads, target, kind, weights)
    return sum(objective_module.layer_weight(n, weights) * straightforward_layer_distance(grads[n], t, kind == "squared_l2")
               for n, t in target.items())


def straightforward_bn_distance(stats, targets, first_bn_multiplier: float, zero: torch.Tensor) -> torch.Tensor:
    """R_BN layer by layer."""
    total = zero
    for index, (name, (mean, var)) in enumerate(targets.items()):
        batch_mean, batch_var = stats[name]
        distance = torch.linalg.vector_norm(batch_mean - mean) + torch.linalg.vector_norm(batch_var - var)
        total = total + (first_bn_multiplier if index == 0 else 1.0) * distance
    return total


def baseline_seconds(model, artifact, labels, config, device, iterations: int) -> float:
    """The straightforward loop: backward() into every leaf, seeds one after the other, every
    layer's distance on its own."""
    with (mock.patch.object(objective_module, "gradient_distance", straightforward_gradient_distance),
          mock.patch.object(objective_module, "bn_distance", straightforward_bn_distance)):
        return _baseline_seconds(model, artifact, labels, config, device, iterations)


def _baseline_seconds(model, artifact, labels, config, device, iterations: int) -> float:
    attacker = train_mode_copy(model).to(device)
    objective = Objective(attacker, artifact, torch.tensor(labels, device=device), config)
    for module in attacker.modules():  # torch's ReLU: the Objective swapped in gradinv.relu's
        if isinstance(module, nn.ReLU):
            module.__class__ = nn.ReLU
    shape = (artifact.batch_size, *artifact.meta["input_shape"])
    seeds = [torch.randn(shape, device=device, requires_grad=True) for _ in range(config.seeds)]
    optimizers = [torch.optim.Adam([x], lr=config.lr) for x in seeds]
    generator = torch.Generator().manual_seed(0)

    def step():
        for x, optimizer in zip(seeds, optimizers):
            optimizer.zero_grad(set_to_none=True)
            attacker.zero_grad(set_to_none=True)
            objective.terms(x, None, rolled_view(config, generator))["total"].backward()
            optimizer.step()

    step()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iterations


def engine_settings(variant: str, seeds: int) -> dict:
    """inversion settings of an `engine-...` variant: eager steps (benchmarks/cuda_graph_check.py times graphed ones)."""
    mode = variant.split("-")[1]
    named = {"loop": 1, "auto": 0, "vmap": seeds}
    batch = named[mode] if mode in named else int(mode.removeprefix("vmap"))
    return {"seed_workers": 0 if mode == "auto" else 1, "seed_batch": batch,
            "channels_last": "channels-last" in variant, "tf32": "tf32" in variant,
            "bn_double_backward": "explicit" if "bn-explicit" in variant else "pytorch",
            "batched_seeds": "stacked" if variant.endswith("-stacked") else "vmap", "cuda_graph": False,
            "keep_freed_memory": not variant.endswith("-default-malloc")}


def engine_seconds(model, artifact, labels, config, iterations: int) -> float:
    invert(model, artifact, labels, build_section("inversion", {**_as_dict(config), "iterations": 2}))  # warm-up
    return invert(model, artifact, labels, config).seconds / iterations


def default_engine_seconds(model, artifact, labels, config, iterations: int) -> float:
    """Seconds per iteration as the difference of a run of 4 + `iterations` and one of 4 (after a
    warm-up run of 4): a graphed run's two eager iterations and its capture fall in both."""
    run = lambda n: invert(model, artifact, labels, build_section("inversion", {**_as_dict(config), "iterations": n}))  # noqa: E731
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
    """FLOPs of one seed's step (forward, parameter gradients, gradient to the input)."""
    objective = Objective(train_mode_copy(model).to(device), artifact, torch.tensor(labels, device=device), config)
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
    tf32 = "tf32" in variant or (shipped and device.type == "cuda" and build_section("inversion", {}).tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    model, artifact, labels = problem(spec["arch"], spec["classes"], spec["px"], spec["batch"])
    settings = {"iterations": spec["iterations"], "seeds": spec["seeds"], "device": spec["device"],
                "checkpoint_every": 0, "log_every": 1000, "registration": "none"}
    if not shipped:  # the engine as shipped keeps every default
        settings.update({"seed_batch": 1, "tf32": tf32})
        if not variant.startswith("baseline"):
            settings.update(engine_settings(variant, spec["seeds"]))
    config = build_section("inversion", settings)
    rss_before = _max_rss_bytes()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if variant == "baseline-keep-freed-memory":
        keep_freed_memory()
    if variant.startswith("baseline"):
        seconds = baseline_seconds(model, artifact, labels, config, device, spec["iterations"])
    elif shipped:
        seconds = default_engine_seconds(model, artifact, labels, config, spec["iterations"])
    else:
        seconds = engine_seconds(model, artifact, labels, config, spec["iterations"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss_bytes()
    key = (spec["arch"], spec["px"], spec["batch"])
    if key not in _FLOPS_PER_SEED:  # the same for every variant
        _FLOPS_PER_SEED[key] = step_flops(model, artifact, labels, config, device)
    flops = spec["seeds"] * _FLOPS_PER_SEED[key]
    return {**spec, "tf32": tf32, "seconds_per_iteration": seconds, "flops_per_iteration": flops,
            "achieved_flops": flops / seconds, "peak_memory_bytes": peak,
            "memory_kind": "max allocated (CUDA)" if device.type == "cuda" else "process max RSS",
            "rss_before_run_bytes": rss_before, "torch_threads": torch.get_num_threads()}


def _as_dict(config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (fp32, tf32) in GPU_PEAKS.items():
            if key in name:
                return {"fp32": fp32, "tf32": tf32, "source": f"nominal dense rates of the {key}"}
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device)
    a @ a
    _sync(device)
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ a
    _sync(device)
    rate = repeats * 2 * size ** 3 / (time.perf_counter() - start)
    return {"fp32": rate, "tf32": rate, "source": f"measured fp32 GEMM {size}x{size} on {torch.get_num_threads()} threads"}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def measure_in_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
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


def run_suite(name: str, device: torch.device, out: Path, resume: bool = False, variants: list[str] | None = None) -> dict:
    """Every configuration of the suite (of the named variants); with `resume`, only those missing from `out`."""
    suite = SUITES[name]
    result = resumed_result(device, out) if resume else {
        "suite": name, "machine": machine(device), "peak": device_peak(device), "rows": [],
        "command": f"python benchmarks/step_speed.py --suite {name}" + (f" --variants {' '.join(variants)}" if variants else "")}
    done = {(r["batch"], r["seeds"], r["variant"]) for r in result["rows"]}
    groups: dict[tuple[int, int], list[str]] = {}
    for batch, seeds, variant in selected_configs(name, variants):
        if (batch, seeds, variant) not in done:
            groups.setdefault((batch, seeds), []).append(variant)
    measure_one = measure_here if device.type == "cuda" else measure_in_subprocess
    for (batch, seeds), variants in groups.items():
        specs = [{"suite": name, "device": str(device), "arch": suite["arch"], "classes": suite["classes"],
                  "px": suite["px"], "batch": batch, "seeds": seeds, "variant": variant, "iterations": suite["iterations"]}
                 for variant in variants]
        for row in measured_in_rounds(specs, suite["rounds"], measure_one):
            result["rows"].append({**row, "run": result.get("runs", 1)})
            if "error" in row:
                print(f"{row['variant']:32s} bs {batch:2d} G {seeds}: failed ({row['error']})", flush=True)
            else:
                print(f"{row['variant']:32s} bs {batch:2d} G {seeds}: {row['seconds_per_iteration']:.4f} s/it, "
                      f"{row['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
        out.write_text(json.dumps(result, indent=1))
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


def timing_note(row: dict) -> str:
    rounds, iterations = row.get("rounds", 1), row["iterations"]
    if rounds == 1:
        return f"Seconds per iteration: one timed run of {iterations} iterations after a warm-up."
    return (f"Seconds per iteration: the median of {rounds} rounds, each a fresh process per configuration of a batch "
            f"size and seed count in turn, timing {iterations} iterations after a warm-up (every round in the results file).")


def table(result: dict) -> str:
    peak = result["peak"]
    baseline = {(r["batch"], r["seeds"]): r["seconds_per_iteration"] for r in result["rows"]
                if r["variant"] == "baseline" and "error" not in r}
    lines = [f"### {result['suite'].upper()}: {result['rows'][0]['arch']}, {result['rows'][0]['px']} px",
             "", *([result["note"], ""] if "note" in result else []),  # a second machine's file says why it is there
             f"Machine: {json.dumps(result['machine'])}.", f"Peak used for the fraction: {peak['source']}.",
             f"Command: `{result['command']}`" + (f" (and `--resume` on the same kind of machine: {result['runs']} runs, "
                                                  "each row's `run` in the results file)" if result.get("runs", 1) > 1 else ""),
             timing_note(result["rows"][0]), "",
             "| bs | G | variant | s / iteration | speed-up vs baseline | GFLOP / iteration | achieved GFLOP/s | of peak | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["batch"], r["seeds"])):
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['seeds']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        rate = peak["tf32"] if r.get("tf32", "tf32" in r["variant"]) else peak["fp32"]
        base = baseline.get((r["batch"], r["seeds"]))
        speedup = f"{base / r['seconds_per_iteration']:.2f}x" if base else "(no baseline run)"
        lines.append(f"| {r['batch']} | {r['seeds']} | {r['variant']} | {r['seconds_per_iteration']:.3f} | {speedup} | "
                     f"{r['flops_per_iteration'] / 1e9:.2f} | {r['achieved_flops'] / 1e9:.1f} | "
                     f"{r['achieved_flops'] / rate:.1%} | {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['memory_kind']}) |")
    return "\n".join(lines)


def paper_projection(result: dict, probes: dict | None) -> str:
    """Minutes for the paper preset (bs 8, G 8, 20K iterations) from each variant's measured step
    (the step alone: the consensus refresh every 100 iterations comes on top)."""
    lines = [f"Paper preset (ResNet-50, 224 px, bs 8, G 8, 20,000 iterations), projected from the steps measured on "
             f"the {result['machine'].get('gpu', 'GPU')} (target: 30 minutes on an H100):", ""]
    for r in result["rows"]:
        if r["batch"] == 8 and r["seeds"] == 8 and "error" not in r:
            lines.append(f"- {r['variant']}: {r['seconds_per_iteration'] * 20000 / 60:.0f} minutes")
    for r in (probes or {}).get("rows", []):
        if r["probe"] == "graph-vmap" and "error" not in r:
            lines.append(f"- the same step batched and replayed as a CUDA graph (gpu_probes.py, before the engine's "
                         f"`inversion.cuda_graph`): "
                         f"{r['graph_replay_s'] * 20000 / 60:.0f} minutes")
    return "\n".join(lines)


def tf32_quality_section(result: dict) -> str:
    lines = [f"### Effect on reconstruction quality ({result['machine']['device']})", "",
             f"The embedded default pipeline ({result['iterations']} iterations, G {result['seeds']}), one gradient, "
             "inverted once per setting. Command: `" + result["command"] + "`", "",
             "| setting | PSNR chosen seed (dB) | SSIM | PSNR consensus (dB) | final gradient distance per seed | s / iteration |",
             "|---|---|---|---|---|---|"]
    for name, r in result["results"].items():
        if "error" in r:
            lines.append(f"| {name} | stopped: {r['error']} | | | | |")
            continue
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['consensus_psnr']:.2f} | "
                     f"{', '.join(f'{v:.4g}' for v in r['final_grad_loss'])} | {r['seconds_per_iteration']:.4f} |")
    return "\n".join(lines)


def probes_section(result: dict) -> str:
    runs = result.get("runs", {})
    lines = [f"### CUDA graphs, cuDNN autotuning, profile ({result['machine'].get('gpu', 'GPU')})", "",
             "ResNet-50 at 224 px, TF32 on. " + result.get("note", ""), ""]
    for r in result["rows"]:
        command = f" (`{runs[str(r['run'])]}`)" if str(r.get("run")) in runs else f" (`{result['command']}`)"
        if "error" in r:
            lines.append(f"- {r['probe']}, bs {r['batch']}: failed: `{r['error']}`{command}")
        elif r["probe"] in ("graph", "graph-vmap"):
            lines.append(f"- CUDA graph of the whole step, bs {r['batch']}, G {r.get('seeds', 1)}"
                         f"{' (batched)' if r.get('seeds', 1) > 1 else ''}: eager {r['eager_s'] * 1e3:.0f} ms, replay "
                         f"{r['graph_replay_s'] * 1e3:.0f} ms ({r['speedup']:.2f}x){command}")
        elif r["probe"] == "autotune":
            lines.append(f"- cudnn.benchmark, bs {r['batch']}: off {r['eager_s'] * 1e3:.0f} ms, on "
                         f"{r['autotuned_s'] * 1e3:.0f} ms ({r['speedup']:.2f}x){command}")
        elif r["probe"] == "compile":
            lines.append(f"- torch.compile, bs {r['batch']}: eager {r['eager_s'] * 1e3:.0f} ms, compiled "
                         f"{r['compiled_s'] * 1e3:.0f} ms ({r['speedup']:.2f}x; first call {r['first_call_s']:.0f} s){command}")
    for r in result["rows"]:
        if r["probe"] == "profile" and "table" in r:
            table = r["table"].splitlines()
            lines += ["", f"Profile of three eager steps, one seed, bs {r['batch']}{command}: top operators by GPU time.", "",
                      "```", *table[:16], *table[-3:], "```"]
    return "\n".join(lines)


def convolutions_named(row: dict) -> str:
    """A row's `inversion.conv_double_backward`, as a table names it (nothing for torch's own)."""
    mode = row.get("conv_double_backward", "pytorch")
    return "" if mode == "pytorch" else f", convolutions {mode}"


def against_bound(speed_rows: list[dict], roofline: dict, gpu: str) -> list[str]:
    """Each timed bs 8 G 8 row (the layout step_roofline counted) beside its counted traffic and
    arithmetic: achieved rates and how far above the bound it runs."""
    counted = {(r["bn_double_backward"], "vmap", "pytorch"): r for r in roofline["rows"] if (r["batch"], r["seeds"]) == (8, 8)}
    counted.update({(r["bn_double_backward"], "stacked", "pytorch"): r for r in roofline.get("stacked_seeds_rows", [])})
    counted.update({(r["bn_double_backward"], "vmap", r["conv_double_backward"]): r
                    for r in roofline.get("explicit_conv_rows", []) + roofline.get("fused_bn_rows", [])
                    if r.get("precision", "float32") == "float32"})
    peak = roofline["gpus"][gpu]
    lines = []
    for r in speed_rows:
        c = counted.get((r["bn_double_backward"], r.get("batched_seeds", "vmap"), r.get("conv_double_backward", "pytorch")))
        if ((r["batch"], r["seeds"]) != (8, 8) or r.get("channels_last") or "error" in r or c is None
                or r.get("precision", "float32") != "float32"):  # counted in float32
            continue
        t = r["seconds_per_iteration"]
        lines.append(f"- {'graphed' if r['cuda_graph'] else 'eager'}, BN {r['bn_double_backward']}, seeds "
                     f"{r.get('batched_seeds', 'vmap')}{convolutions_named(r)}"
                     f"{', cudnn.benchmark' if r.get('cudnn_benchmark') else ''}: "
                     f"{c['bytes'] / t / 1e12:.2f} TB/s of the counted {c['bytes'] / 1e9:.0f} GB "
                     f"({c['bytes'] / t / peak['bandwidth']:.0%} of the {gpu}'s {peak['bandwidth'] / 1e12:.2f} TB/s), "
                     f"{c['flops'] / t / 1e12:.1f} TFLOP/s ({c['flops'] / t / peak['tf32']:.1%} of TF32), "
                     f"{t / (c[f'paper_minutes_{gpu}'] * 60 / 20000):.1f}x its bound")
    return lines


def cuda_graph_section(result: dict, roofline: dict | None = None) -> str:
    """benchmarks/cuda_graph_check.py: the graphed step, the explicit BN double backward and stacked seeds against the default."""
    check = result.get("check", {})
    title = (f"### CUDA graphs, the explicit BN double backward and stacked seeds in the engine "
             f"({result['machine'].get('gpu', 'GPU')})")
    if not check:
        verdict = "not run by this command (--skip-check)."
    elif "error" in check:
        verdict = f"FAILED to run: {check['error']}"
    else:
        noise = check["float_noise_one_by_one_vs_batched"]
        repeat = ("deterministic kernels repeat an eager run exactly" if check["deterministic"] else
                  "two eager runs differ from iteration 1 on even with deterministic kernels, so a graphed run may differ "
                  "from its eager twin at each iteration by at most 10x the largest difference two eager runs have shown "
                  "up to then")
        verdict = (f"{'passed' if check['passed'] else 'FAILED'}; {repeat}. Float noise "
                   f"(seeds one by one against batched): logged totals within {noise['logged_totals_max_rel_diff']:.1%}, "
                   f"images within {noise['images_drift_of_movement']:.1%} of their movement.")
    lines = [title, "", f"Command: `{result['command']}`. Same path (resnet18, 32 px, bs 4, G 4, 40 iterations, jitter, "
             f"flips, Langevin, consensus; TF32 off, deterministic kernels): {verdict}", ""]
    graph_demand = "must be identical" if check.get("deterministic") else "held to two eager runs' difference"
    for group, demand in (("identical", graph_demand), ("within_float_noise", "other kernels, within float noise")):
        for name, m in check.get(group, {}).items():
            early = ", ".join(f"{d:.1e}" for d in m.get("by_iteration", [])[1:4])
            lines.append(f"- {name.replace('_', ' ')} ({demand}): iterations 1-3 within {early}; iteration-0 totals within "
                         f"{m['iteration0_total_max_rel_diff']:.1e}, logged totals within {m['logged_totals_max_rel_diff']:.1e}, "
                         f"images within {m['images_drift_of_movement']:.1e} of their movement")
    if result.get("speed"):
        lines += ["", "ResNet-50, 224 px, TF32, seeds batched; s / iteration from the difference of two run lengths.", "",
                  "| bs | G | BN double backward | seeds batched by | eager s / it | graphed s / it | graphed speed-up | "
                  "peak memory eager / graphed |",
                  "|---|---|---|---|---|---|---|---|"]
        layout_of = lambda r: (r.get("batched_seeds", "vmap") + (", channels_last" if r.get("channels_last") else "")  # noqa: E731
                               + convolutions_named(r)
                               + (", cudnn.benchmark" if r.get("cudnn_benchmark") else "")
                               + (f", {r['precision']}" if r.get("precision", "float32") != "float32" else ""))
        timed = [r for r in result["speed"] if not r.get("defaults")]
        rows = {(r["batch"], r["seeds"], r["bn_double_backward"], layout_of(r), r["cuda_graph"]): r for r in timed}
        cell = lambda r: r.get("error") or f"{r['seconds_per_iteration']:.3f}"  # noqa: E731
        memory = lambda r: "-" if "error" in r else f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"  # noqa: E731
        not_run = {"error": "not run"}
        for (batch, seeds, bn, layout, graph), timed_row in rows.items():
            if graph and (batch, seeds, bn, layout, False) in rows:
                continue  # in its eager twin's line
            row = not_run if graph else timed_row  # a graphed variant timed alone: cudnn.benchmark
            other = timed_row if graph else rows.get((batch, seeds, bn, layout, True), not_run)
            ratio = ("-" if "error" in row or "error" in other
                     else f"{row['seconds_per_iteration'] / other['seconds_per_iteration']:.2f}x")
            lines.append(f"| {batch} | {seeds} | {bn} | {layout} | {cell(row)} | {cell(other)} | {ratio} | "
                         f"{memory(row)} / {memory(other)} |")
        lines += ["", "Paper preset projected (bs 8, G 8, 20,000 iterations): " + "; ".join(
            f"{'graphed' if r['cuda_graph'] else 'eager'}, BN {r['bn_double_backward']}, seeds "
            f"{layout_of(r)}: {r['paper_preset_minutes']:.0f} minutes"
            for r in timed if "paper_preset_minutes" in r) + "."]
        for r in result["speed"]:
            if r.get("defaults"):
                lines += ["", f"The defaults as shipped (seed_batch, cuda_graph, bn_double_backward: auto), bs {r['batch']}, "
                              f"G {r['seeds']}: " + (r["error"] if "error" in r else
                                                    f"{r['seconds_per_iteration']:.3f} s / it, peak memory "
                                                    f"{r['peak_memory_bytes'] / 2**30:.1f} GiB") + "."]
        gpu = next((name for name in (roofline or {}).get("gpus", {}) if name in result["machine"].get("gpu", "")), None)
        if gpu:
            lines += ["", f"Against what one step must move and compute (benchmarks/step_roofline.py; bs 8, G 8, "
                          f"the layout it counted; the counts are of the step as it runs now, a timing taken before a "
                          f"change to the step's operations is set against the count after it):", "",
                      *against_bound(timed, roofline, gpu)]
    return "\n".join(lines)


def counted_step(r: dict, minutes: str = ".0f", flops: bool = False) -> str:
    """One counted step (a step_roofline.py row): its operations, bytes and the paper preset at its bound."""
    return (f"{r['ops']} operations, {r['bytes'] / 1e9:.0f} GB, " + (f"{r['flops'] / 1e12:.2f} TFLOP, " if flops else "")
            + f"**{r['paper_minutes_H100']:{minutes}} minutes on an H100** ({r['paper_minutes_H200']:{minutes}} on an H200) "
            "for the paper preset")


def roofline_section(result: dict, measured: dict | None, probes: dict | None) -> str:
    """benchmarks/step_roofline.py: the step's bandwidth/compute bound, beside the H200's measured steps."""
    gpus, rows = result["gpus"], result["rows"]
    lines = ["### The physical limit of the step as written", "",
             f"Command: `{result['command']}` (counts the engine's batched step on fake tensors: every aten operation "
             "that moves data, its bytes in and out and its FLOPs). Bound = Σ over operations of max(bytes / bandwidth, "
             "FLOPs / TF32 rate), nominal " + ", ".join(f"{n}: {g['bandwidth'] / 1e12:.2f} TB/s, {g['tf32'] / 1e12:.0f} "
                                                        "TFLOP/s" for n, g in gpus.items()) +
             ": no kernel schedule of these operations runs faster, short of the L2 cache serving some: operations moving "
             "under 50 MB each account for " + ", ".join(f"{r['bytes_of_ops_under_l2'] / r['bytes']:.0%}" for r in rows) +
             " of the bytes (rows in order). `BN double backward`: `inversion.bn_double_backward` (pytorch: autograd's "
             "generic formula; explicit: gradinv/batchnorm.py). Measured steps use pytorch's.", "",
             "| BN double backward | bs | G | aten operations | GB moved | GFLOP | bound H100 | bound H200 | "
             "measured H200: fastest engine variant / graph replay (probe) |",
             "|---|---|---|---|---|---|---|---|---|"]
    eager: dict[tuple, float] = {}
    for r in (measured or {}).get("rows", []):
        if "error" not in r and r["variant"].startswith("engine"):
            key = (r["batch"], r["seeds"])
            eager[key] = min(eager.get(key, float("inf")), r["seconds_per_iteration"])
    replay = {(r["batch"], r.get("seeds", 1)): r["graph_replay_s"] for r in (probes or {}).get("rows", [])
              if r["probe"] in ("graph", "graph-vmap") and "error" not in r}
    for r in rows:
        key = (r["batch"], r["seeds"])
        seen = (" / ".join(f"{d[key] * 1e3:.0f} ms" if key in d else "-" for d in (eager, replay))
                if r["bn_double_backward"] == "pytorch" else "not measured")
        lines.append(f"| {r['bn_double_backward']} | {r['batch']} | {r['seeds']} | {r['ops']} | {r['bytes'] / 1e9:.0f} | "
                     f"{r['flops'] / 1e9:.0f} | {r['bound_s_H100'] * 1e3:.0f} ms | {r['bound_s_H200'] * 1e3:.0f} ms | {seen} |")
    lines += ["", "Paper preset (bs 8, G 8, 20,000 iterations) at the bound:", ""]
    for r in rows:
        if "paper_minutes_H100" in r:
            lines.append(f"- BN double backward {r['bn_double_backward']}: **{r['paper_minutes_H100']:.0f} minutes on an "
                         f"H100**, {r['paper_minutes_H200']:.0f} on an H200; {r['paper_minutes_H100_large_ops_only']:.0f} on "
                         "an H100 if every operation under 50 MB cost nothing")
    stacked = result.get("stacked_seeds_rows", [])
    if stacked:
        lines += ["", "The same step with the seeds stacked into the channels instead of vmapped (`inversion.batched_seeds: "
                  "stacked`, gradinv/stacked_seeds.py: grouped convolutions, one copy of the weights per seed, no layout "
                  "changes between BatchNorm and the convolutions), bs 8 G 8: " +
                  "; ".join(f"BN double backward {r['bn_double_backward']}: {counted_step(r)}" for r in stacked) + "."]
    half = result.get("half_precision_rows", [])
    if half:
        lines += ["", "The same step (vmap, explicit BN, bs 8 G 8) under `inversion.precision` (autocast as a CPU applies it; the "
                  "bound at the half type's nominal tensor-core rate, " + ", ".join(
                      f"{n}: {g['half'] / 1e12:.0f} TFLOP/s" for n, g in gpus.items() if "half" in g) + "): " +
                  "; ".join(f"{r['precision']}: {counted_step(r)}" for r in half) + "."]
    explicit_conv = result.get("explicit_conv_rows", [])
    if explicit_conv:
        lines += ["", "The same step (vmap, explicit BN, bs 8 G 8) with the convolutions' double backward written out "
                  "(`inversion.conv_double_backward`, gradinv/convolution.py: explicit-grouped, the seeds kept folded into "
                  "the channels where BatchNorm folds them, no activations copied between layouts; explicit, each seed's "
                  "convolutions dense, one per seed, instead of one grouped over the seeds): " +
                  "; ".join(f"{r['conv_double_backward']}, {r.get('precision', 'float32')}: {counted_step(r, flops=True)}"
                            for r in explicit_conv) + ". Neither computes the weights' own second derivative, which no "
                  "image gradient needs."]
    fused = result.get("fused_bn_rows", [])
    if fused:
        lines += ["", "The same step (vmap, bs 8 G 8) with BatchNorm's elementwise derivatives in Triton kernels "
                  "(`inversion.bn_double_backward: explicit-fused`, gradinv/bn_elementwise.py: the double backward's "
                  "two outputs in 5 passes, where five `addcmul`s made 13; the last backward's input gradient with the "
                  "BN prior's statistics in 5, where the backward kernel and the term added after it made 8): " +
                  "; ".join(f"convolutions {r['conv_double_backward']}, {r['precision']}: {counted_step(r, '.1f')}"
                            for r in fused) + "."]
    for mode, ops in result["top_ops_bs8_g8"].items():
        lines += ["", f"Operations moving most data at bs 8 G 8, BN double backward {mode}: " +
                  "; ".join(f"{o['op']} {o['calls']}× {o['bytes'] / 1e9:.0f} GB" for o in ops[:8]) + "."]
    return "\n".join(lines)


def write_doc() -> Path:
    parts = ["# Inversion step speed", "",
             "Written by `benchmarks/step_speed.py` (`--doc` rewrites it alone) from the results files in",
             "benchmarks/results/ of step_speed.py, step_roofline.py, tf32_quality.py, gpu_probes.py and",
             "cuda_graph_check.py; each section names the command and the machine behind its figures. What",
             "the figures mean, and which settings they made the defaults: README, section Speed.", ""]
    by_suite = lambda path: (path.stem.split("-")[1], path.stem.count("-"), path.name)  # noqa: E731 (-cpu, -cpu-second, -gpu)
    found = {path.stem.split("-", 1)[1]: json.loads(path.read_text()) for path in sorted(RESULTS.glob("step_speed-*.json"), key=by_suite)}
    for result in found.values():
        parts += [table(result), ""]
    probes = json.loads((RESULTS / "gpu_probes.json").read_text()) if (RESULTS / "gpu_probes.json").is_file() else None
    for key, result in found.items():  # gpu_probes ran beside the file named step_speed-gpu.json
        if result["suite"] == "gpu":
            parts += [paper_projection(result, probes if key == "gpu" else None), ""]
    if (RESULTS / "step_roofline.json").is_file():
        parts += [roofline_section(json.loads((RESULTS / "step_roofline.json").read_text()), found.get("gpu"), probes), ""]
    roofline = json.loads((RESULTS / "step_roofline.json").read_text()) if (RESULTS / "step_roofline.json").is_file() else None
    for name, section in (("tf32_quality", tf32_quality_section), ("gpu_probes", probes_section),
                          ("cuda_graph", lambda result: cuda_graph_section(result, roofline))):
        if (RESULTS / f"{name}.json").is_file():
            parts += [section(json.loads((RESULTS / f"{name}.json").read_text())), ""]
        # more runs of the same script: half precision per machine; a GPU lease's focused timings
        more = {"tf32_quality": ("precision_quality-*.json", tf32_quality_section), "cuda_graph": ("cuda_graph-*.json", section)}
        if name in more:
            pattern, render = more[name]
            parts += [part for path in sorted(RESULTS.glob(pattern)) for part in (render(json.loads(path.read_text())), "")]
    if "gpu" not in found:
        parts += ["### GPU", "", "No GPU figures yet: on a GPU machine, `python benchmarks/step_speed.py --suite gpu` (it needs",
                  "only torch and torchvision besides this repository) measures ResNet-50 at 224 px, bs 1/8/48,",
                  "G 1/4/8, and projects the paper preset (bs 8, G 8, 20K iterations).", ""]
    DOC.write_text("\n".join(parts))
    return DOC


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--device", default=None, help="default: cuda for the gpu suite, cpu otherwise")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/step_speed-<suite>.json)")
    parser.add_argument("--doc", action="store_true", help="only rewrite docs/step_speed.md from the results files")
    parser.add_argument("--resume", action="store_true",
                        help="measure only the configurations missing from the results file (same kind of machine)")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: every variant of the suite)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    if args.doc:
        print(f"doc: {write_doc()}")
        return 0
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step_speed: the gpu suite needs CUDA, and torch sees no GPU.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / f"step_speed-{args.suite}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_suite(args.suite, device, out, args.resume and out.is_file(), args.variants)
    print(f"results: {out}\ndoc:     {write_doc()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
