"""Prefect flows: the whole pipeline, one stage (as dvc.yaml runs them), many batches, sweeps."""

import tasks  # noqa: F401  (sets Prefect's and Dask's environment before either is imported)
