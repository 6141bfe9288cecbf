"""Checks `engine.cuda_graph` and `engine.bn_double_backward: explicit` against the default step on a GPU, and times them.

    python -m benchmarks.cuda_graph_check            # on a CUDA machine; torch and torchvision only

1. Same path: resnet18 at 32 px, bs 4, G 4, with every per-iteration input a graph must refresh
   (jitter, flips, Langevin noise, the consensus from iteration 2 on, refreshed every other
   iteration), TF32 off, deterministic kernels. A graphed run against its eager twin (both BN
   double backwards), and a graphed run interrupted after iteration 24
   and resumed from its checkpoint against an uninterrupted one: identical at every logged
   iteration where an eager run repeats itself exactly; where it does not (CUDA, measured), at
   each iteration within 10x the largest difference two eager runs have shown up to then. The
   explicit BN double backward (and, against it, `explicit-fused`) runs other
   kernels: equal at iteration 0 (same
   images, same draws), later no further apart than float noise alone takes two runs (seeds one
   by one against batched).
2. Speed: ResNet-50 at 224 px (random weights), TF32 on, seeds batched, eager against graphed,
   each with either BatchNorm double backward: seconds per iteration from two run lengths (the difference
   leaves out warm-up and capture), peak memory; the paper preset (bs 8, G 8, 20K iterations)
   projected in minutes; then the defaults as shipped at bs 48, G 8 (the paper's largest batch
   must fit an 80 GB card). The default step (G > 1) once more with cuDNN's autotuner
   (`torch.backends.cudnn.benchmark`: graphed, the tuning happens in the eager warm-up; its
   heuristics put a generic convolution kernel at 18 % of the step, step_profile.py), and at the
   paper preset under `engine.precision` bfloat16 and float16 (autocast; what they do to the
   reconstruction: tf32_quality.py), with `engine.bn_double_backward: explicit-fused` (Triton
   kernels for BatchNorm's elementwise derivatives) and with `engine.conv_double_backward` explicit-grouped
   (no activations copied between layouts) and explicit (each seed's convolutions dense instead
   of grouped), autotuned and in half precision (PRESET_CANDIDATES, the likeliest first). A
   variant that fails is recorded with its error.

    python -m benchmarks.cuda_graph_check --skip-check --focus   # ~5 min: the paper preset's default
                                                                  # step and those candidates only

Writes benchmarks/results/cuda_graph.json (with the machine and the command) after the check
and after every speed row; exit 1 when a check fails. `--rejudge FILE` applies this script's criteria to the
differences a results file recorded (no GPU needed) and rewrites its verdict.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# cuBLAS is deterministic across streams (a graph is captured on a side stream) only with a fixed
# workspace; set before CUDA starts. It limits the classifier's matmul workspace, nothing else.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from benchmarks.common import RESULTS, argument_parser, command, machine, problem, write_result  # noqa: E402 (after the cuBLAS setting)
from gradinv.attack.inversion import invert  # noqa: E402
from gradinv.pipeline.config import build_section  # noqa: E402

IDENTICAL_TOTALS, IDENTICAL_IMAGES = 1e-5, 1e-4  # float precision, far below float noise's drift (~10 %, ~80 %)
# Where an eager run does not repeat itself exactly (CUDA: on an H100, even with deterministic kernels,
# two eager runs differ by 5e-5 at iteration 1 and 2.6e-3 at iteration 2), a graphed run may differ
# from its eager twin at each iteration by at most NOISE_FACTOR times the most two eager runs have
# differed up to then: a view, noise or consensus refreshed wrongly is off by far more at once.
NOISE_FACTOR = 10
CHECK_SETTINGS = {"iterations": 40, "seeds": 4, "warmup": 4, "jitter": 2, "flip": True, "langevin": 0.2,
                  "alpha_group": 0.01, "group_start": 2, "group_refresh": 2, "registration": "none",
                  "log_every": 1, "checkpoint_every": 5}
CHECK_ENGINE = {"tf32": False, "seed_batch": 4}
SPEED_CONFIGS = [(8, 8), (1, 8), (1, 1)]  # (bs, G): the paper preset first
# (cuda_graph, BN double backward): the former default step first.
VARIANTS = [(False, "pytorch"), (True, "pytorch"), (False, "explicit"), (True, "explicit")]
AUTOTUNED = (True, "explicit")  # the CUDA default with several seeds, timed again under cudnn.benchmark
# The paper preset's candidates beyond the autotuned default, the likeliest first (a short lease keeps
# what it reached): `engine.bn_double_backward: explicit-fused` (BatchNorm's elementwise derivatives
# in Triton kernels) with and without `engine.conv_double_backward` explicit-grouped
# (torch's kernels, no activations copied between layouts: together the fewest bytes of any vmapped
# step, step_roofline.py), explicit (each seed's convolutions dense), half precision under autocast,
# cuDNN's autotuner.
GROUPED, DENSE = {"conv_double_backward": "explicit-grouped"}, {"conv_double_backward": "explicit"}
FUSED = {"bn_double_backward": "explicit-fused"}
FLOAT16, BFLOAT16, AUTOTUNE = {"precision": "float16"}, {"precision": "bfloat16"}, {"cudnn_benchmark": True}
PRESET_CANDIDATES = [{**GROUPED, **FUSED}, GROUPED, FUSED, {**GROUPED, **FUSED, **FLOAT16}, {**GROUPED, **FLOAT16},
                     FLOAT16, {**GROUPED, **BFLOAT16}, BFLOAT16, {**GROUPED, **AUTOTUNE}, DENSE, {**DENSE, **AUTOTUNE},
                     {**DENSE, **FLOAT16}, {**DENSE, **BFLOAT16}]


class Interrupted(Exception):
    pass


def agreement(reference, other) -> dict:
    """How closely `other` followed `reference`: iteration-0 totals (same images, same draws),
    every logged total, the final images (in units of how far the reference moved)."""
    moved = (reference.images - reference.initial).abs().mean().item()
    first = lambda result: [r["total"] for r in result.log if r["iteration"] == 0]  # noqa: E731
    return {"iteration0_total_max_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(first(reference), first(other))),
            "logged_totals_max_rel_diff": max(abs(a["total"] - b["total"]) / abs(a["total"])
                                              for a, b in zip(reference.log, other.log)),
            "images_drift_of_movement": (other.images - reference.images).abs().mean().item() / moved,
            "same_log_rows": len(reference.log) == len(other.log), "by_iteration": by_iteration(reference, other)}


def by_iteration(reference, other) -> list[float]:
    """The largest relative difference of the seeds' totals at each logged iteration."""
    worst: dict[int, float] = {}
    for a, b in zip(reference.log, other.log):
        worst[a["iteration"]] = max(worst.get(a["iteration"], 0.0), abs(a["total"] - b["total"]) / abs(a["total"]))
    return [float(f"{worst[i]:.3g}") for i in sorted(worst)]


def follows(measured: dict, repeated: dict) -> bool:
    """At every logged iteration no further from its eager twin than NOISE_FACTOR times the largest
    difference two eager runs (`repeated`) have shown up to that iteration."""
    noise_so_far = [max(repeated["by_iteration"][:i + 1]) for i in range(len(repeated["by_iteration"]))]
    return measured["same_log_rows"] and all(diff <= NOISE_FACTOR * noise + 1e-6
                                             for diff, noise in zip(measured["by_iteration"], noise_so_far))


def agrees(measured: dict, float_noise: dict) -> bool:
    """Same start to float precision, and no further apart later than float noise alone takes
    two runs of the same step (`float_noise`: seeds one by one against batched)."""
    return (measured["iteration0_total_max_rel_diff"] < 1e-4 and measured["same_log_rows"]
            and measured["logged_totals_max_rel_diff"] <= max(2 * float_noise["logged_totals_max_rel_diff"], 0.01)
            and measured["images_drift_of_movement"] <= max(2 * float_noise["images_drift_of_movement"], 0.05))


def graphs_agree(same: dict) -> bool:
    """Graphed runs identical to their eager twins where eager runs repeat themselves exactly,
    otherwise following them as closely as two eager runs follow each other."""
    if identical(same["eager_repeated"]):
        return all(identical(m) for m in same.values())
    return all(follows(m, same["eager_repeated"]) for name, m in same.items() if name != "eager_repeated")


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """cuDNN's and torch's deterministic algorithms while active, so that where the kernels allow
    it the same computation twice gives the same bits and a graphed step can be held to its eager
    twin exactly (a 40-iteration trajectory is chaotic: Adam turns float differences into steps of
    size lr). On an H100 two eager runs still differed; `graphs_agree` then uses their difference."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@contextmanager
def cudnn_autotuned(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuner (each convolution shape timed once, the fastest algorithm kept) while active."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def identical(measured: dict) -> bool:
    """The same trajectory to float precision at every logged iteration."""
    return (measured["same_log_rows"] and measured["logged_totals_max_rel_diff"] <= IDENTICAL_TOTALS
            and measured["images_drift_of_movement"] <= IDENTICAL_IMAGES)


def same_path_check(device: str) -> dict:
    """Under deterministic kernels: a graphed run against its eager twin (each BN double backward)
    and a graphed run interrupted and resumed against an uninterrupted one, judged by `graphs_agree`
    against two eager runs; the explicit BN double backward (other kernels) against the default
    within float noise."""
    model, artifact, labels = problem("resnet18", 12, 32, 4)
    config = build_section("inversion", CHECK_SETTINGS)

    def engine(graph: bool = False, bn: str = "pytorch", **extra):
        return build_section("engine", {**CHECK_ENGINE, "device": device, "cuda_graph": graph, "bn_double_backward": bn,
                                        **extra})

    def run(*args, **extra):
        return invert(model, artifact, labels, config, engine=engine(*args, **extra))

    def interrupt_after_24(step, _values):
        if step == 25:
            raise Interrupted

    with deterministic_kernels():
        eager, explicit = run(), run(False, "explicit")
        same = {"eager_repeated": agreement(eager, run()), "graphed_vs_eager": agreement(eager, run(True)),
                "graphed_vs_eager_explicit_bn": agreement(explicit, graphed_explicit := run(True, "explicit"))}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / "run.safetensors"
            try:
                invert(model, artifact, labels, config, interrupt_after_24, checkpoint, "key", engine=engine(True, "explicit"))
            except Interrupted:
                pass
            resumed = invert(model, artifact, labels, config, None, checkpoint, "key", engine=engine(True, "explicit"))
        same["resumed_vs_uninterrupted_graphed"] = agreement(graphed_explicit, resumed)
        float_noise = agreement(eager, run(seed_batch=1, seed_workers=1))
        other_kernels = {"explicit_bn_vs_pytorch": agreement(eager, explicit),
                         "explicit_fused_bn_vs_explicit": agreement(explicit, run(False, "explicit-fused"))}
    return judged({"identical": same, "within_float_noise": other_kernels, "float_noise_one_by_one_vs_batched": float_noise})


def seconds_per_iteration(model, artifact, labels, settings: dict, engine: dict, short: int, long: int) -> tuple[float, int]:
    """(seconds per iteration from the difference of a short and a long run, peak allocated bytes)."""
    times = {}
    for iterations in (short, short, long):  # the first short run warms cuDNN and the allocator up
        torch.cuda.reset_peak_memory_stats()
        config = build_section("inversion", {**settings, "iterations": iterations})
        times[iterations] = invert(model, artifact, labels, config, engine=build_section("engine", engine)).seconds
    return (times[long] - times[short]) / (long - short), torch.cuda.max_memory_allocated()


def speed_plan(focus: bool = False) -> list[tuple[int, int, dict]]:
    """(bs, G, variant) in the order they run: every variant at the paper preset first, then the
    defaults as shipped at the paper's largest batch (bs 48, G 8: must fit an 80 GB card), then
    the bs 1 rows. A variant lists the `engine` settings it fixes (and cudnn_benchmark, torch's
    own); the defaults row fixes none. With
    `focus`, the paper preset's default step and its candidates only (autotuned, PRESET_CANDIDATES):
    the rows a short GPU lease must not miss."""
    plan = []
    for batch, seeds in SPEED_CONFIGS:
        variant = lambda graph, bn: {"cuda_graph": graph, "bn_double_backward": bn, "seed_batch": seeds}  # noqa: E731
        default, preset = variant(*AUTOTUNED), (batch, seeds) == (8, 8)
        if focus and not preset:
            continue
        plan += [(batch, seeds, default)] if focus else [(batch, seeds, variant(*v)) for v in VARIANTS]
        if seeds > 1:
            plan.append((batch, seeds, {**default, "cudnn_benchmark": True}))
        if preset:
            plan += [(batch, seeds, {**default, **candidate}) for candidate in PRESET_CANDIDATES]
            plan += [] if focus else [(48, 8, {})]
    return plan


def speed(device: str, short: int, long: int, on_row=lambda rows: None, focus: bool = False) -> list[dict]:
    """Every entry of speed_plan; `on_row(rows)` after each, so a run cut short keeps what it measured.
    A variant that fails is a row with its error, and the others still run."""
    rows = []
    for batch, seeds, fixed in speed_plan(focus):
        model, artifact, labels = problem("resnet50", 1000, 224, batch)
        engine = {"device": device, "tf32": True, **{k: v for k, v in fixed.items() if k != "cudnn_benchmark"}}
        settings = {"seeds": seeds, "registration": "none", "checkpoint_every": 0, "log_every": 100_000, "warmup": 1}
        named = {k: v for k, v in fixed.items() if k != "seed_batch"} if fixed else {"defaults": True}
        variant = {"batch": batch, "seeds": seeds, **named}
        try:
            with cudnn_autotuned(fixed.get("cudnn_benchmark", False)):
                seconds, peak = seconds_per_iteration(model, artifact, labels, settings, engine, short, long)
            row = {**variant, "seconds_per_iteration": seconds, "peak_memory_bytes": peak}
            if (batch, seeds) == (8, 8):
                row["paper_preset_minutes"] = seconds * 20000 / 60
        except torch.cuda.OutOfMemoryError:
            row = {**variant, "error": "out of GPU memory"}
        except Exception as error:  # noqa: BLE001 - one failing variant must not cost the others' figures
            traceback.print_exc()
            row = {**variant, "error": f"{type(error).__name__}: {error}"[:400]}
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
        on_row(rows)
        print(json.dumps(row), flush=True)
    return rows


def judged(check: dict) -> dict:
    """A check's differences with their verdict under this script's criteria (also of a recorded check)."""
    passed = graphs_agree(check["identical"]) and all(agrees(m, check["float_noise_one_by_one_vs_batched"])
                                                       for m in check["within_float_noise"].values())
    return {**check, "deterministic": identical(check["identical"]["eager_repeated"]), "passed": passed}


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("cuda_graph_check", __doc__)
    parser.add_argument("--out", default=str(RESULTS / "cuda_graph.json"))
    parser.add_argument("--short", type=int, default=4, help="iterations of the short timed run")
    parser.add_argument("--long", type=int, default=14, help="iterations of the long timed run")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-check", action="store_true", help="time only (the same-path check passed on two H100 runs)")
    parser.add_argument("--focus", action="store_true",
                        help="time the paper preset's default step and its candidates only (speed_plan)")
    parser.add_argument("--rejudge", metavar="FILE", help="rewrite the verdict of a recorded check under these criteria")
    args = parser.parse_args(argv)
    if args.rejudge:
        recorded = json.loads(Path(args.rejudge).read_text())
        recorded["check"] = judged(recorded["check"])
        Path(args.rejudge).write_text(json.dumps(recorded, indent=1))
        print(f"check {'passed' if recorded['check']['passed'] else 'FAILED'}")
        return 0 if recorded["check"]["passed"] else 1
    if not torch.cuda.is_available():
        print("cuda_graph_check: needs CUDA, and torch sees no GPU.", file=sys.stderr)
        return 2
    result = {"machine": machine(torch.device("cuda")),
              "command": command("cuda_graph_check", sys.argv[1:] if argv is None else argv)}
    if not args.skip_check:
        try:
            result["check"] = same_path_check("cuda")
        except Exception as error:  # noqa: BLE001 - the speed figures are still worth having
            traceback.print_exc()
            result["check"] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:400]}
        print(json.dumps(result["check"]), flush=True)
        write_result(args.out, result)
    if not args.skip_speed:
        def keep(rows):
            result["speed"] = rows
            write_result(args.out, result)
        speed("cuda", args.short, args.long, keep, args.focus)
    return 0 if args.skip_check or result["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
