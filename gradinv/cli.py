"""`gradinv <stage>`: run one pipeline stage (or all) from params.yaml, without any orchestrator.

User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradinv.config import load_params
from gradinv.errors import UserError
from gradinv.stages import STAGES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradinv", description="GradInversion audit of a shared gradient.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project folder holding data/ (default: .)")
    parser.add_argument("command", choices=[*STAGES, "all"], help="a stage, or 'all' to run every stage in order")
    return parser


def run(command: str, params_path: str, root: str) -> None:
    params = load_params(params_path)
    names = list(STAGES) if command == "all" else [command]
    for name in names:
        stage = STAGES[name]
        print(f"# {name}")
        for path in stage.run(params[stage.section], Path(root), None):
            print(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args.command, args.params, args.root)
    except UserError as err:
        print(f"gradinv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradinv: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
