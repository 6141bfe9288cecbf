"""The federation as one cached Prefect task: Flower's Simulation Engine runs the embedded app,
and the recorder's folders are committed as one output (a rerun with the same inputs is cached)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefect import task

from gradinv.commit import committed
from gradinv.pipeline.federation import DEPLOYMENT, REPLIES
from gradinv.pipeline.folders import SETS, VICTIM
from gradinv.pipeline.sources import source_files
from tasks.caching import PACKAGE_ROOT, hash_tree

_SOURCES = sorted({*source_files("gradinv.client.flower.apps"), *source_files("gradinv.client.flower.deployment"),
                   "tasks/federation.py", "tasks/caching.py"})


def federation_key(root: str, settings: dict, engine: str) -> str:
    """The federation's inputs: the engine, the app's settings, the data sets and victim, and the
    code it runs. The engines compute the same updates, but asking for the other engine means
    running it."""
    digest = hashlib.sha256(f"federation|{Path(root).resolve()}|{engine}|".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for folder in (Path(root) / SETS, Path(root) / VICTIM):
        hash_tree(folder, digest)
    for source in _SOURCES:
        hash_tree(PACKAGE_ROOT / source, digest)
    return digest.hexdigest()


@task(cache_key_fn=lambda _context, p: federation_key(p["root"], p["settings"], p["engine"]), persist_result=True,
      result_serializer="json", log_prints=True)
def run_federation(root: str, settings: dict, engine: str = "simulation") -> str:
    """Returns the recorder's folder (root/data/federation/replies), written as a whole."""
    from gradinv.client.flower.apps import run_simulation
    from gradinv.client.flower.deployment import run_on_deployment

    flower_log = logging.getLogger("flwr")
    flower_log.propagate = False  # Flower prints its own lines; Prefect would print each again
    try:
        with committed(Path(root) / REPLIES) as (staging,):
            if engine == "deployment":
                run_on_deployment({**settings, "out-dir": str(staging)}, Path(root) / DEPLOYMENT)
            else:
                run_simulation({**settings, "out-dir": str(staging)})
    finally:
        flower_log.propagate = True
    return str(Path(root) / REPLIES)


def federation_done(root: str, settings: dict, engine: str) -> bool:
    """Run the federation task (recomputed when its cached folder is gone); True if it was cached."""
    state = run_federation(root, settings, engine, return_state=True)
    if state.name == "Cached" and not (Path(state.result()) / "replies.json").is_file():
        state = run_federation.with_options(refresh_cache=True)(root, settings, engine, return_state=True)
    state.result()
    return state.name == "Cached"
