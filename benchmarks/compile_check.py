"""Can torch.compile run the inversion step? One step through a compiled forward, on the CPU.

    .venv/bin/python benchmarks/compile_check.py

The step differentiates the parameter gradients again (create_graph=True), so the compiled
forward must support double backward. Writes benchmarks/results/compile_check.json with the
outcome, the torch version and the machine.
"""

from __future__ import annotations

import json
import platform
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
from step_speed import problem  # noqa: E402


def main() -> int:
    model, artifact, labels = problem("resnet18", 12, 32, 8)
    config = build_section("inversion", {"seeds": 1, "device": "cpu", "registration": "none"})
    compiled = train_mode_copy(model)
    compiled.forward = torch.compile(compiled.forward)  # the module keeps its layer names
    objective = Objective(compiled, artifact, torch.tensor(labels), config)
    x = torch.randn((8, 3, 32, 32), requires_grad=True)
    start = time.perf_counter()
    try:
        torch.autograd.grad(objective.terms(x)["total"], x)
        outcome = {"works": True}
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        outcome = {"works": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    result = {**outcome, "seconds": time.perf_counter() - start, "torch": torch.__version__,
              "machine": platform.platform(), "command": "python benchmarks/compile_check.py"}
    out = REPO / "benchmarks" / "results" / "compile_check.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
