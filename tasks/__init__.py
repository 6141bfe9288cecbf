"""Prefect tasks: thin wrappers over gradinv stage functions (caching, retries, MLflow logging)."""

import os
from pathlib import Path

# Keep Prefect's state inside the project and quiet; must happen before prefect is imported.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# Dask workers log every connection at INFO; warnings and errors are what a user needs.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
