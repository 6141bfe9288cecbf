"""The terminal during a flow run: the project's lines and Prefect's warnings, without Prefect's
routine lifecycle lines (in the flow's process and in every Dask worker that runs a task)."""

from __future__ import annotations

import logging
import re

# Prefect's own lifecycle lines, which repeat what the flow prints at the end of every stage.
_LIFECYCLE = re.compile(r"^(Finished in state (Completed|Cached)|Created task run|Beginning flow run|Executing flow run)")


class _QuietLifecycle(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _LIFECYCLE.match(record.getMessage())


def quiet_prefect_lifecycle() -> None:
    """Keep the project's lines and Prefect's warnings in the terminal, drop Prefect's routine lines."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLifecycle) for f in logger.filters):
            logger.addFilter(_QuietLifecycle())
