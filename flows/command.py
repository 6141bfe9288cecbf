"""The command line every flow module shares: `python -m flows.<name> [--params] [--root] ...`,
params validated before Prefect starts, user errors as one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from gradinv.errors import UserError
from gradinv.pipeline.config import load_params
from tasks.terminal import quiet_prefect_lifecycle

RESUME = ("rerun the same command to go on: finished stages and batches are cached, and an inversion resumes "
          "from its last checkpoint in data/.checkpoints")


def run_flow_command(prog: str, doc: str, run: Callable[[argparse.Namespace], str],
                     argv: list[str] | None = None, add_arguments: Callable | None = None) -> int:
    """Parse the common arguments (plus `add_arguments(parser)`), then print what `run(args)` returns.
    `doc` is the flow module's docstring: its first paragraph is the --help description."""
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    quiet_prefect_lifecycle()
    try:
        load_params(args.params, getattr(args, "preset", None))  # fail fast, before Prefect (and Dask) start
        report = run(args)
    except UserError as err:
        print(f"gradinv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradinv: interrupted; {RESUME}.", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - shown whole, then what a rerun does
        traceback.print_exc()
        print(f"gradinv: the run failed (above); once the cause is fixed, {RESUME}.", file=sys.stderr)
        return 1
    print(report)
    return 0
