"""Atomic, pickle-free reading and writing of the files that stages hand each other; reads are
checked against the folder's manifest (gradinv.commit) unless told the file comes from the user.

safetensors and pyarrow are imported where they are used: the inversion itself (and the speed
benchmark on a bare GPU machine) runs with torch and torchvision alone."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from gradinv.atomic import atomic_path
from gradinv.commit import expected_digest, settle
from gradinv.errors import UserError


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_bytes(path: str | os.PathLike, what: str, verify: bool = True) -> bytes:
    """The file's bytes; with `verify`, checked against its folder's manifest (gradinv.commit)."""
    path = Path(path)
    if verify:
        settle(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist.")
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != expected_digest(path, what):
        raise UserError(f"{what} {path} does not match the checksum in its folder's manifest: it was changed or "
                        f"damaged after gradinv wrote it; rerun the stage that writes {path.parent}.")
    return data


def read_json(path: str | os.PathLike, what: str, verify: bool = True) -> dict:
    data = read_bytes(path, what, verify)
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({err}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} must hold a JSON object.")
    return obj


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    contiguous = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp))
        except SafetensorError as err:  # an I/O failure inside the Rust writer: full disk above all
            code = errno.ENOSPC if "StorageFull" in str(err) or "code: 28" in str(err) else errno.EIO
            raise OSError(code, str(err), str(path)) from None
    return Path(path)


def read_tensors(path: str | os.PathLike, what: str, verify: bool = True) -> dict[str, torch.Tensor]:
    data = read_bytes(path, what, verify)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{what} {path} is not a readable safetensors file ({err}).") from None


def write_table(path: str | os.PathLike, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(path: str | os.PathLike, what: str = "table", verify: bool = True):
    """A pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(path, what, verify)
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{what} {path} is not a readable Parquet file ({err}).") from None
