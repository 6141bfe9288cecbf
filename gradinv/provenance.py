"""Where a result came from: the code's git commit, branch and uncommitted changes, and the
hash of dvc.lock (which pins every stage's inputs and outputs)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

CODE_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, object]:
    """{"commit", "branch", "dirty"}; each None where the code is not a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status)}


def dvc_lock_digest(root: str | Path) -> str | None:
    lock = Path(root) / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
