"""Input-based cache keys for stage tasks: the content of the stage's input folders, its params
section (plus the engine settings that change results) and its sources as derived from the code
(gradinv.pipeline.stages), exactly what dvc.yaml declares. Speed-only engine settings are not part
of any key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gradinv.pipeline.config import build_section, result_changing
from gradinv.pipeline.stages import STAGES

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def hash_tree(path: Path, digest) -> None:
    """Feed every file under `path` (sorted, names and bytes) into `digest`."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.name.startswith(".") and file.name.endswith(".tmp"):
            continue
        digest.update(str(file.relative_to(path.parent)).encode())
        if file.exists():
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)


def stage_key(stage_name: str, root: str | Path, params: dict, engine: dict | None = None) -> str:
    stage = STAGES[stage_name]
    root = Path(root).resolve()
    digest = hashlib.sha256()
    digest.update(f"{stage_name}|{root}|".encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    if stage.uses_engine:
        digest.update(json.dumps(result_changing(build_section("engine", engine)), sort_keys=True).encode())
    for folder in stage.inputs:
        hash_tree(root / folder, digest)
    for source in stage.sources:
        hash_tree(PACKAGE_ROOT / source, digest)
    return digest.hexdigest()


def stage_cache_key(_context, parameters: dict) -> str:
    """Prefect `cache_key_fn` for tasks called as (stage_name, root, params, ..., engine)."""
    return stage_key(parameters["stage_name"], parameters["root"], parameters["params"], parameters.get("engine"))
