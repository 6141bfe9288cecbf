"""The many-batch task: one batch's whole attack (all its seeds) on one Dask worker."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from prefect import task

from gradinv.pipeline import batches
from gradinv.pipeline.config import as_dict, build_section, result_changing
from gradinv.pipeline.sources import source_files
from gradinv.trust import trust_model_code
from tasks.caching import PACKAGE_ROOT, hash_tree
from tasks.terminal import quiet_prefect_lifecycle

ATTACK_SECTIONS = ("capture", "labels", "inversion", "engine", "evaluation")
USER_MODEL = "victim_arch"  # the model spec params.yaml names: workers may import it (gradinv.trust)
_SOURCES = sorted({*source_files("gradinv.pipeline.batches"), "tasks/batches.py", "tasks/caching.py"})


def attack_params(params: dict) -> dict:
    """What a worker needs of the loaded params.yaml: the attack's sections as plain dicts, and the
    model spec the user named."""
    return {**{s: as_dict(params[s]) for s in ATTACK_SECTIONS}, USER_MODEL: params["victim"].arch}


def batch_key(root: str, out: str, index: int, params: dict) -> str:
    """The batch's inputs: the data sets and victim, its params sections (of the engine's, only
    the settings that change results) and the code."""
    digest = hashlib.sha256(f"batch|{Path(root).resolve()}|{out}|{index}|".encode())
    sections = {s: params[s] for s in ATTACK_SECTIONS if s != "engine"}
    sections["engine"] = result_changing(build_section("engine", params.get("engine")))
    digest.update(json.dumps(sections, sort_keys=True).encode())
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


def _restore_glibc_heap_for_tensors() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set. An explicit trim threshold
    turns glibc's dynamic mmap threshold off, so every tensor over 128 KiB is mmapped and unmapped
    again: the inversion ran 2.8x slower in a worker (1.67 vs 0.60 s per iteration, resnet18 32 px,
    bs 8, 4 seeds, one thread). Large blocks go back to the heap, and the heap is trimmed rarely."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the variable means nothing there
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 256 << 20)


def _worker_configs(params: dict, torch_threads: int | None) -> dict:
    """The attack's config objects, on a worker made ready for it."""
    quiet_prefect_lifecycle()
    _restore_glibc_heap_for_tensors()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    trust_model_code(params.get(USER_MODEL))
    configs = {name: build_section(name, params[name]) for name in ATTACK_SECTIONS}
    configs["engine"] = _device_for_this_worker(configs["engine"])
    return configs


def _recorded_cache_key(_context, parameters: dict) -> str:
    """A recorded reply's attack: the reply's folders, the client's truth, the sections and the code."""
    params = parameters["params"]
    digest = hashlib.sha256(f"recorded|{Path(parameters['folder']).resolve()}|".encode())
    sections = {s: params[s] for s in ATTACK_SECTIONS if s != "engine"}
    sections["engine"] = result_changing(build_section("engine", params.get("engine")))
    digest.update(json.dumps(sections, sort_keys=True).encode())
    for folder in (Path(parameters["folder"]) / "victim", Path(parameters["folder"]) / "gradient",
                   Path(parameters["truth"]), Path(parameters["root"]) / batches.SETS):
        hash_tree(folder, digest)
    for source in _SOURCES:
        hash_tree(PACKAGE_ROOT / source, digest)
    return digest.hexdigest()


@task(cache_key_fn=_recorded_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def attack_recorded(root: str, folder: str, truth: str, params: dict, torch_threads: int | None = None) -> dict:
    """Labels, inversion and evaluation of one recorded federation reply; returns its row of metrics."""
    return batches.run_recorded(_worker_configs(params, torch_threads), root, folder, truth, "python -m flows.federation")


@task(cache_key_fn=_batch_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def attack_batch(root: str, out: str, index: int, params: dict, torch_threads: int | None = None) -> dict:
    """Capture, labels, inversion and evaluation of batch `index`; returns its row of metrics."""
    return batches.run_batch(_worker_configs(params, torch_threads), root, out, index)
