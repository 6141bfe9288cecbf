"""What the benchmarks share: where results go, the machine's description, the problem they time
(a random-weight victim, one client's gradient, its labels), the attacker's objective as the
engine builds it, and the engine's step on fake tensors (step_roofline.py, step_memory.py).

Every benchmark runs from the repository root as `python -m benchmarks.<name>`; none imports
another benchmark, only this module.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradinv.attack.inversion import attacker_objective, pixel_box
from gradinv.attack.objective import Objective
from gradinv.client.capture import client_update
from gradinv.client.models import build_model
from gradinv.engine import SeedStep, StepPlan
from gradinv.pipeline.config import build_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"


def argument_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """Benchmark `name`'s parser: --help describes it with its docstring's whole first paragraph."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=" ".join(doc.split("\n\n")[0].split()))


def mean_std(values: list[float]) -> dict:
    """A figure over batches as the results files record it: its mean and sample standard deviation."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def command(name: str, argv: list[str]) -> str:
    """The command line that ran benchmark `name` with `argv`, as a results file records it."""
    return " ".join(["python -m", f"benchmarks.{name}", *(shlex.quote(a) for a in argv)])


def write_result(path: str | Path, result: dict) -> Path:
    """A results file (JSON), its folder made if needed; rewritten whole, so that a run cut short
    keeps what it wrote last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def machine(device: torch.device) -> dict:
    """The machine a figure was measured on, as the results files record it."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def machine_line() -> str:
    """The machine in one line (ablation.py, registration.py)."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def problem(arch: str, classes: int, px: int, batch: int):
    """A random-weight model, one client's gradient artifact for a random batch, its labels (on
    the CPU; cached: every variant of a batch size shares them). The step's cost does not depend
    on the weights."""
    torch.manual_seed(0)
    model = build_model(arch, classes).eval()
    images = torch.randn(batch, 3, px, px)
    labels = torch.randperm(classes)[:batch] if batch <= classes else torch.randint(classes, (batch,))
    meta = {"arch": arch, "num_classes": classes, "input_shape": [3, px, px], "mean": [0.5] * 3, "std": [0.25] * 3}
    artifact = client_update(model, images, labels, "exact", meta)
    return model, artifact, labels.tolist()


@contextmanager
def fake_step(batch: int, seeds: int, bn_double_backward: str, chunk: int | None = None,
              watch: TorchDispatchMode | None = None, precision: str = "float32",
              conv_double_backward: str = "pytorch") -> Iterator[tuple[SeedStep, Objective]]:
    """The engine's step for ResNet-50 at 224 px, its seeds vmapped in chunks of `chunk` seeds
    (default: all at once), as the graphed step runs them (even chunks of one seed), on fake
    tensors (shapes only: no memory, any batch): yields (step, objective) inside FakeTensorMode,
    the first step (which creates Adam's state) taken. `watch`, a dispatch mode, sees every
    operation on fake tensors, the making of the step's own included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, artifact, _ = problem("resnet50", 1000, 224, 1)  # weights and artifact do not depend on bs
    cpu = torch.device("cpu")
    config = build_section("inversion", {"seeds": seeds, "registration": "none"})
    engine = build_section("engine", {"device": "cpu", "bn_double_backward": bn_double_backward, "precision": precision,
                                      "conv_double_backward": conv_double_backward, "cuda_graph": False})
    objective = attacker_objective(model, artifact, torch.zeros(batch, dtype=torch.int64), config, engine, cpu)
    objective._functional_model()  # the copies of the model are made here: fake tensors cannot be deep-copied
    box = pixel_box(artifact.meta["mean"], artifact.meta["std"], cpu)
    plan = StepPlan(cpu, chunk or seeds, workers=1, graphed=False, shrink_if_out_of_memory=False)
    with FakeTensorMode(allow_non_fake_inputs=True), watch or nullcontext():
        step = SeedStep([objective] * seeds, torch.zeros(seeds, batch, 3, 224, 224), config, engine, box, plan)
        step.batched = True  # as under a CUDA graph, which needs Adam on CUDA (capturable) to be built
        step.fill(config.lr, [(0, 0, False)] * seeds)
        step.step(False, None)
        yield step, objective
