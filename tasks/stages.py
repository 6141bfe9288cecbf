"""One Prefect task that runs any pipeline stage, cached on the stage's inputs."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gradinv.config import build_section
from gradinv.stages import STAGES
from tasks.caching import outputs_present, stage_cache_key
from tasks.tracking import Tracker


@task(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def run_stage(stage_name: str, root: str, params: dict, tracker: Tracker | None = None) -> list[str]:
    """Run one stage (params: its params.yaml section as a dict); returns the paths it wrote."""
    stage = STAGES[stage_name]
    config = build_section(stage.section, params)
    on_log = (lambda step, values: tracker.metrics(values, step=step)) if tracker else None
    return [str(p) for p in stage.run(config, Path(root), on_log)]


def stage_task(stage_name: str, root: str):
    """The task for one stage, named after it; a cached result whose files are gone is recomputed."""
    return run_stage.with_options(name=stage_name, refresh_cache=not outputs_present(stage_name, root))
