"""Output folders that commit as a whole, with manifests that make every file verifiable.

`committed(*folders)` hands a writer staging folders beside its outputs. When the block succeeds,
each folder gets manifest.json (every file's sha256), a journal records the commit, and each
staging folder is exchanged with its output in one atomic rename (renameat2 RENAME_EXCHANGE on
Linux). Once the journal exists the commit is decided: `recover` completes it after a kill, and
removes staging folders of commits that were never decided. Readers (gradinv.io) verify every file
against its folder's manifest, so a changed, damaged or half-written folder is refused."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import inspect
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from gradinv.atomic import after_rename, atomic_path, disk_errors
from gradinv.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "gradinv-manifest/1"
_JOURNAL = ".commit.json"      # suffix of `.<token>.commit.json` in the outputs' parent folder
_STAGING = ".staging"          # suffix of `.<folder>.<token>.staging`
_RENAME_EXCHANGE = 2


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file of `folder` (and, with a manifest of their own, of its sub-folders) with its
    sha256: readers refuse any file that does not match."""
    folder = Path(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        write_manifest(sub)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    manifest = {"format": FORMAT, "files": {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size}
                                            for p in files}}
    return _write_json(folder / MANIFEST, manifest)


def _write_json(path: Path, obj: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


def settle(path: Path) -> None:
    """Complete any pending commit that `path` (a file in an output folder) may belong to."""
    recover(path.parent.parent)
    recover(path.parent.parent.parent)  # where a commit of several folders (import-gradient) keeps its journal


def expected_digest(path: Path, what: str) -> str:
    """The sha256 that `path`'s folder manifest records for it; one sentence if there is none."""
    folder = path.parent
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{what} {path} lies in a folder without {MANIFEST}, so gradinv cannot tell whether it is "
                        f"complete and unchanged; rerun the stage that writes {folder}.")
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    entry = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise UserError(f"{what} {path} is not listed in {folder / MANIFEST}; rerun the stage that writes {folder}.")
    return entry["sha256"]


@contextmanager
def committed(*folders: str | os.PathLike, removing: tuple[str | os.PathLike, ...] = ()) -> Iterator[list[Path]]:
    """Staging folders for `folders`, created before the block (so an unwritable place fails
    before any work), committed together after it, with the folders `removing` removed in the
    same commit; on error nothing of the outputs changes. The journal and the staging folders lie
    in the folders' nearest common parent."""
    removing = [Path(f).absolute() for f in removing]
    folders = [Path(f).absolute() for f in folders]
    parent = Path(os.path.commonpath([f.parent for f in folders + removing]))
    names = [f.relative_to(parent).as_posix() for f in folders]
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    recover(parent)
    stagings = [_staging(parent, name, token) for name in names]
    journal = parent / f".{token}{_JOURNAL}"
    try:
        with disk_errors(parent):
            for staging in stagings:
                staging.mkdir(parents=True)
        yield stagings
        with disk_errors(parent):
            for staging in stagings:
                write_manifest(staging)
            # A folder keeps its inode through renames: how recovery tells a done exchange from one to do.
            _write_json(journal, {"folders": names, "inodes": [s.stat().st_ino for s in stagings],
                                  "removing": [f.relative_to(parent).as_posix() for f in removing], "token": token})
            _complete(journal)
    finally:
        if not journal.exists():  # a decided commit that failed halfway is completed by the next run
            for staging in stagings:
                shutil.rmtree(staging, ignore_errors=True)


def commits(*folder_args: str) -> Callable:
    """Decorate a function that writes into the folders given as the arguments `folder_args` and
    returns the paths it wrote: it writes into staging folders instead, which are committed
    together when it returns; the paths returned are those of the committed files."""
    def decorate(write: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
        signature = inspect.signature(write)

        @functools.wraps(write)
        def write_committed(*args, **kwargs) -> list[Path]:
            bound = signature.bind(*args, **kwargs)
            folders = [Path(bound.arguments[name]) for name in folder_args]
            with committed(*folders) as stagings:
                bound.arguments.update(zip(folder_args, stagings))
                written = write(*bound.args, **bound.kwargs)
            return [_relocated(Path(p), stagings, folders) for p in written]
        return write_committed
    return decorate


def _relocated(path: Path, stagings: list[Path], folders: list[Path]) -> Path:
    for staging, folder in zip(stagings, folders):
        if path.is_relative_to(staging):
            return folder / path.relative_to(staging)
    return path


def _staging(parent: Path, name: str, token: str) -> Path:
    return parent / f".{name.replace('/', '-')}.{token}{_STAGING}"


def _complete(journal: Path) -> None:
    """Exchange each staging folder named by `journal` with its output, unless already done."""
    parent = journal.parent
    record = json.loads(journal.read_text())
    for name, inode in zip(record["folders"], record["inodes"]):
        folder, staging = parent / name, _staging(parent, name, record["token"])
        if staging.is_dir() and not (folder.is_dir() and folder.stat().st_ino == inode):
            folder.parent.mkdir(parents=True, exist_ok=True)
            _exchange(staging, folder)
        shutil.rmtree(staging, ignore_errors=True)
    for name in record.get("removing", []):
        if (parent / name).exists():
            trash = _staging(parent, name, record["token"])
            os.rename(parent / name, trash)
            after_rename()
            shutil.rmtree(trash, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _exchange(staging: Path, folder: Path) -> None:
    """Put `staging` at `folder` in one rename; the old `folder`, if any, ends up at `staging`."""
    if not folder.exists():
        os.rename(staging, folder)
    elif not _rename_exchange(staging, folder):
        old = staging.with_name(staging.name + ".old")
        os.rename(folder, old)
        after_rename()
        os.rename(staging, folder)
        os.rename(old, staging)
    after_rename()


def _rename_exchange(a: Path, b: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def recover(parent: str | os.PathLike) -> None:
    """In `parent`: complete the decided commits whose writer has died, and remove the staging
    folders that no decided commit names."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for journal in sorted(parent.glob(f".*{_JOURNAL}")):
        if not _alive(journal.name[1:-len(_JOURNAL)]):
            _complete(journal)
    for staging in parent.glob(f".*{_STAGING}*"):
        token = staging.name.split(f"{_STAGING}")[0].rsplit(".", 1)[-1]
        if not _alive(token) and not (parent / f".{token}{_JOURNAL}").exists():
            shutil.rmtree(staging, ignore_errors=True)


def _alive(token: str) -> bool:
    """Whether the process that made `token` still runs (this process counts as running)."""
    pid = token.split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
