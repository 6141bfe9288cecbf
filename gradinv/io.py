"""Atomic, pickle-free reading and writing of the files that stages hand each other.

safetensors and pyarrow are imported where they are used: the inversion itself (and the speed
benchmark on a bare GPU machine) runs with torch and torchvision alone."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from gradinv.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared artifacts unreadable to others
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({err}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} must hold a JSON object.")
    return obj


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    contiguous = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        from safetensors.torch import save_file

        save_file(contiguous, str(tmp))
    return Path(path)


def read_tensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{what} {path} is not a readable safetensors file ({err}).") from None


def write_table(path: str | os.PathLike, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(path: str | os.PathLike):
    """A pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(path)
