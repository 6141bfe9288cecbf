"""The many-batch task: one batch's whole attack (all its seeds) on one Dask worker."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from prefect import task

from gradinv import batches
from gradinv.config import build_section
from gradinv.stages import STAGES
from tasks.caching import PACKAGE_ROOT, hash_tree

ATTACK_SECTIONS = ("capture", "labels", "inversion", "evaluation")
_SOURCES = sorted({s for name in ("capture", "labels", "invert", "evaluate") for s in STAGES[name].sources}
                  | {"gradinv/batches.py", "tasks/batches.py", "tasks/caching.py"})


def batch_key(root: str, out: str, index: int, params: dict) -> str:
    """The batch's inputs: the data sets and victim, its params sections and the code."""
    digest = hashlib.sha256(f"batch|{Path(root).resolve()}|{out}|{index}|".encode())
    digest.update(json.dumps({s: params[s] for s in ATTACK_SECTIONS}, sort_keys=True).encode())
    for folder in (batches.SETS, batches.VICTIM):
        hash_tree(Path(root) / folder, digest)
    for source in _SOURCES:
        hash_tree(PACKAGE_ROOT / source, digest)
    return digest.hexdigest()


def _batch_cache_key(_context, parameters: dict) -> str:
    return batch_key(parameters["root"], parameters["out"], parameters["index"], parameters["params"])


def _device_for_this_worker(config):
    """On a LocalCluster, worker k of n takes GPU k mod (GPU count): one task per GPU. Workers
    started by hand (one per GPU, CUDA_VISIBLE_DEVICES set) keep `auto`, which is their GPU."""
    if config.device != "auto" or not torch.cuda.is_available():
        return config
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return config
    if isinstance(name, int):
        return dataclasses.replace(config, device=f"cuda:{name % torch.cuda.device_count()}")
    return config


@task(cache_key_fn=_batch_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def attack_batch(root: str, out: str, index: int, params: dict, torch_threads: int | None = None) -> dict:
    """Capture, labels, inversion and evaluation of batch `index`; returns its row of metrics."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    configs = {name: build_section(name, params[name]) for name in ATTACK_SECTIONS}
    configs["inversion"] = _device_for_this_worker(configs["inversion"])
    return batches.run_batch(configs, root, out, index)
