"""The pipeline's stages: what each reads, writes and depends on, and how to run it.

This registry is the single description that the CLI, the Prefect tasks and dvc.yaml follow
(a test checks dvc.yaml against it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gradinv import capture, data, evaluate, inversion, labels, victim

SETS, VICTIM = "data/sets", "data/victim"
GRADIENT, TRUTH = "data/capture/gradient", "data/capture/truth"
LABELS, INVERT, EVAL = "data/labels", "data/invert", "data/eval"

LogCallback = Callable[[int, dict], None]
COMMON_MODULES = ("gradinv/config.py", "gradinv/errors.py", "gradinv/io.py")


@dataclass(frozen=True)
class Stage:
    name: str
    section: str                 # params.yaml section
    inputs: tuple[str, ...]      # folders written by earlier stages
    outputs: tuple[str, ...]     # folders this stage writes
    modules: tuple[str, ...]     # library sources whose change makes the stage stale
    run: Callable[[object, Path, LogCallback | None], list[Path]]

    @property
    def sources(self) -> tuple[str, ...]:
        return COMMON_MODULES + self.modules


def _prepare(config, root: Path, on_log=None):
    return data.prepare(config, root / SETS)


def _train(config, root: Path, on_log=None):
    return victim.train(config, root / SETS, root / VICTIM, on_log)


def _capture(config, root: Path, on_log=None):
    return capture.capture(config, root / SETS, root / VICTIM, root / GRADIENT, root / TRUTH)


def _labels(config, root: Path, on_log=None):
    return labels.run_labels(config, root / VICTIM, root / GRADIENT, root / LABELS)


def _invert(config, root: Path, on_log=None):
    return inversion.run_inversion(config, root / VICTIM, root / GRADIENT, root / LABELS, root / INVERT, on_log)


def _evaluate(config, root: Path, on_log=None):
    return evaluate.evaluate(config, root / INVERT, root / LABELS, root / TRUTH, root / SETS, root / VICTIM, root / EVAL)


_MODEL_MODULES = ("gradinv/models.py", "gradinv/victim.py", "gradinv/data.py", "gradinv/progress.py")
_ATTACK_MODULES = _MODEL_MODULES + ("gradinv/artifacts.py", "gradinv/defenses.py")
_CLIENT_MODULES = ("gradinv/client.py", "gradinv/batchnorm.py")  # client.py takes BN statistics from batchnorm.py

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "data", (), (SETS,), ("gradinv/data.py",), _prepare),
    Stage("train", "victim", (SETS,), (VICTIM,), _MODEL_MODULES, _train),
    Stage("capture", "capture", (SETS, VICTIM), (GRADIENT, TRUTH),
          _ATTACK_MODULES + _CLIENT_MODULES + ("gradinv/capture.py",), _capture),
    Stage("labels", "labels", (VICTIM, GRADIENT), (LABELS,),
          _ATTACK_MODULES + _CLIENT_MODULES + ("gradinv/labels.py",), _labels),
    Stage("invert", "inversion", (VICTIM, GRADIENT, LABELS), (INVERT,),
          _ATTACK_MODULES + _CLIENT_MODULES + (
              "gradinv/objective.py", "gradinv/relu.py", "gradinv/stacked_seeds.py", "gradinv/consensus.py",
              "gradinv/checkpoint.py", "gradinv/views.py", "gradinv/cuda_graph.py", "gradinv/seed_step.py",
              "gradinv/inversion.py"), _invert),
    Stage("evaluate", "evaluation", (INVERT, LABELS, TRUTH, SETS, VICTIM), (EVAL,),
          _MODEL_MODULES + ("gradinv/metrics.py", "gradinv/perceptual.py", "gradinv/report.py",
                            "gradinv/evaluate.py", "gradinv/capture.py", "gradinv/defenses.py", "gradinv/inversion.py"),
          _evaluate),
)}
