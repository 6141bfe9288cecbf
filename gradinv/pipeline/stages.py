"""The pipeline's stages: what each reads, writes and depends on, and how to run it.

This registry is the single description that the CLI, the Prefect tasks and dvc.yaml follow
(scripts/write_dvc_yaml.py writes dvc.yaml from it; a test checks the two agree). A stage's
sources are derived from the code: every project module its entry module imports, transitively,
plus the files that run every stage (this registry and the Prefect task with its cache key)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from gradinv.attack import inversion, labels
from gradinv.client import capture, data, victim
from gradinv.evaluation import evaluate
from gradinv.pipeline.config import EngineConfig
from gradinv.pipeline.folders import EVAL, GRADIENT, INVERT, LABELS, SETS, TRUTH, VICTIM
from gradinv.pipeline.sources import source_files

__all__ = ["EVAL", "GRADIENT", "INVERT", "LABELS", "SETS", "STAGES", "Stage", "TRUTH", "VICTIM"]

LogCallback = Callable[[int, dict], None]
# What runs any stage: the registry, and the Prefect task with its cache key.
RUNNER_FILES = ("gradinv/pipeline/stages.py", "tasks/stages.py", "tasks/caching.py")


@dataclass(frozen=True)
class Stage:
    name: str
    section: str                 # params.yaml section
    inputs: tuple[str, ...]      # folders written by earlier stages
    outputs: tuple[str, ...]     # folders this stage writes
    entry: str                   # the module whose function the stage runs
    run: Callable[..., list[Path]]  # (config, root, on_log, engine) -> paths written
    uses_engine: bool = False    # also takes params.yaml's `engine` section (speed only)
    reports: bool = False        # also takes where the run is tracked (evaluation.context.Tracking), for its report

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """Project files whose change makes the stage stale."""
        return tuple(sorted({*source_files(self.entry), *RUNNER_FILES}))


def _prepare(config, root: Path, on_log=None, engine=None):
    return data.prepare(config, root / SETS)


def _train(config, root: Path, on_log=None, engine=None):
    return victim.train(config, root / SETS, root / VICTIM, on_log)


def _capture(config, root: Path, on_log=None, engine=None):
    return capture.capture(config, root / SETS, root / VICTIM, root / GRADIENT, root / TRUTH)


def _labels(config, root: Path, on_log=None, engine=None):
    return labels.run_labels(config, root / VICTIM, root / GRADIENT, root / LABELS)


def _invert(config, root: Path, on_log=None, engine=None):
    return inversion.run_inversion(config, root / VICTIM, root / GRADIENT, root / LABELS, root / INVERT, on_log,
                                   engine=engine or EngineConfig())


def _evaluate(config, root: Path, on_log=None, engine=None, tracking=None):
    return evaluate.evaluate(config, root / INVERT, root / LABELS, root / TRUTH, root / SETS, root / VICTIM,
                             root / GRADIENT, root / EVAL, tracking or evaluate.Tracking())


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "data", (), (SETS,), data.__name__, _prepare),
    Stage("train", "victim", (SETS,), (VICTIM,), victim.__name__, _train),
    Stage("capture", "capture", (SETS, VICTIM), (GRADIENT, TRUTH), capture.__name__, _capture),
    Stage("labels", "labels", (VICTIM, GRADIENT), (LABELS,), labels.__name__, _labels),
    Stage("invert", "inversion", (VICTIM, GRADIENT, LABELS), (INVERT,), inversion.__name__, _invert, uses_engine=True),
    Stage("evaluate", "evaluation", (INVERT, LABELS, TRUTH, SETS, VICTIM, GRADIENT), (EVAL,), evaluate.__name__,
          _evaluate, reports=True),
)}
