"""One Prefect task that runs any pipeline stage, cached on the stage's inputs."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gradinv.evaluation.context import Tracking
from gradinv.pipeline.config import build_section
from gradinv.pipeline.stages import STAGES
from tasks.caching import stage_cache_key
from tasks.tracking import Tracker


@task(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def run_stage(stage_name: str, root: str, params: dict, tracker: Tracker | None = None,
              engine: dict | None = None, tracking: Tracking | None = None) -> list[str]:
    """Run one stage (params: its params.yaml section as a dict; engine: the engine section, for
    the stages that take it; tracking: where the run is tracked, for the stages that report it);
    returns the paths it wrote."""
    stage = STAGES[stage_name]
    config = build_section(stage.section, params)
    on_log = (lambda step, values: tracker.metrics(values, step=step)) if tracker else None
    engine_config = build_section("engine", engine) if stage.uses_engine else None
    extra = {"tracking": tracking} if stage.reports and tracking else {}
    return [str(p) for p in stage.run(config, Path(root), on_log, engine_config, **extra)]


def run_cached_stage(stage_name: str, root: str, params: dict, tracker: Tracker | None = None,
                     engine: dict | None = None, tracking: Tracking | None = None) -> tuple[list[str], bool]:
    """Run the stage's task; a cached result whose files are no longer all there is recomputed.
    Returns (paths written, whether they came from the cache)."""
    task_for_stage = run_stage.with_options(name=stage_name)
    state = task_for_stage(stage_name, root, params, tracker, engine, tracking, return_state=True)
    paths = state.result()
    if state.name == "Cached" and not all(Path(p).exists() for p in paths):
        state = task_for_stage.with_options(refresh_cache=True)(stage_name, root, params, tracker, engine, tracking,
                                                                 return_state=True)
        paths = state.result()
    return paths, state.name == "Cached"
