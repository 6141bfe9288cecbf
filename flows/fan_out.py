"""The many-batch fan-out shared by the batches and sweep flows: every batch's attack is one
task, and the tasks spread over Dask workers (a LocalCluster by default, or an existing
cluster by address) through prefect-dask."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dask
from prefect import flow

from gradinv.pipeline.config import BatchesConfig
from tasks.batches import attack_batch, attack_recorded
from tasks.stages import run_cached_stage
from tasks.tracking import Tracker

ADDRESS_ENV = "GRADINV_DASK_ADDRESS"


def task_runner(config: BatchesConfig):
    """A DaskTaskRunner on the cluster at `GRADINV_DASK_ADDRESS` or `batches.address`, else on a
    LocalCluster of `batches.workers` single-threaded worker processes bound to 127.0.0.1."""
    from prefect_dask import DaskTaskRunner

    address = os.environ.get(ADDRESS_ENV) or config.address
    if address:
        return DaskTaskRunner(address=address)
    cluster = {"n_workers": config.workers, "threads_per_worker": 1, "processes": True,
               "host": "127.0.0.1", "dashboard_address": None}
    if config.gpus_per_task:
        cluster["resources"] = {"GPU": config.gpus_per_task}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)


def torch_threads(config: BatchesConfig) -> int | None:
    """Local workers share this machine's cores; a remote cluster's workers keep their own."""
    if os.environ.get(ADDRESS_ENV) or config.address:
        return None
    return max(1, (os.cpu_count() or 1) // config.workers)


@contextmanager
def api_shared_with_workers() -> Iterator[None]:
    """Local Dask workers are new processes: without PREFECT_API_URL each would start a temporary
    Prefect server of its own. Point them at this flow's server while the fan-out runs."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url)
    try:
        yield
    finally:
        del os.environ["PREFECT_API_URL"]


def run_fan_out(root: str, jobs: list[dict], config: BatchesConfig) -> list[dict]:
    """fan_out on the Dask cluster that `batches` names."""
    with api_shared_with_workers():
        return fan_out.with_options(task_runner=task_runner(config))(root, jobs, config.gpus_per_task,
                                                                     torch_threads(config))


def victim_ready(root: str, params_sections: dict, tracker: Tracker) -> None:
    """The victim side every batch shares: the data sets and the trained victim (cached)."""
    for name, section in (("prepare", "data"), ("train", "victim")):
        _, cached = run_cached_stage(name, root, params_sections[section], tracker)
        tracker.log_stage(name, root, live_curve_logged=not cached)
        print(f"{name}: {'cached' if cached else 'done'}")


@flow(name="gradinv-fan-out", log_prints=True)
def fan_out(root: str, jobs: list[dict], gpus_per_task: int = 0, threads: int | None = None) -> list[dict]:
    """Run attack_batch for every job {"out", "index", "params"}, or attack_recorded for a job
    {"recorded": reply folder, "truth", "params"}; returns the rows in job order.
    With gpus_per_task, each task asks Dask for that many 'GPU' resources, so a worker that
    declares one GPU runs one task at a time. A cached batch whose folder is gone runs again."""
    annotations = {"resources": {"GPU": gpus_per_task}} if gpus_per_task else {}

    def submit(job: dict, refresh: bool = False):
        if "recorded" in job:
            runner = attack_recorded.with_options(name=f"reply-{Path(job['recorded']).parent.name}-"
                                                       f"{Path(job['recorded']).name}", refresh_cache=refresh or None)
            with dask.annotate(**annotations):
                return runner.submit(root, job["recorded"], job["truth"], job["params"], threads)
        runner = attack_batch.with_options(name=f"batch-{job['out'].rsplit('/', 1)[-1]}-{job['index']:03d}",
                                           refresh_cache=refresh or None)
        with dask.annotate(**annotations):
            return runner.submit(root, job["out"], job["index"], job["params"], threads)

    futures = [submit(job) for job in jobs]
    rows = [future.result() for future in futures]
    missing = [i for i, row in enumerate(rows) if not (Path(row["folder"]) / "eval" / "metrics.json").is_file()]
    for i, future in zip(missing, [submit(jobs[i], refresh=True) for i in missing]):
        rows[i] = future.result()
    return rows
