"""The lowest layer of writing: files renamed into place whole, and disk errors as one sentence."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gradinv.errors import UserError

KILL_AFTER_RENAMES = "GRADINV_TEST_KILL_AFTER_RENAMES"  # test hook: SIGKILL after the N-th rename
_renames = 0


def after_rename() -> None:
    """Count a rename that commits something; the kill tests stop the process after any of them."""
    global _renames
    limit = os.environ.get(KILL_AFTER_RENAMES)
    if limit:
        _renames += 1
        if _renames == int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def disk_errors(where: str | os.PathLike) -> Iterator[None]:
    """A full disk or a folder gradinv may not write to, as one sentence that says what to do."""
    try:
        yield
    except OSError as err:
        target = err.filename or where
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk holding {target} is full; free some space and rerun "
                            "(earlier outputs are unchanged).") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"gradinv may not write to {target} ({err.strerror}); make the folder writable "
                            "or choose another --root, and rerun.") from None
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    with disk_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            # mkstemp (and safetensors' writer) create 0600 files: shared artifacts must be readable.
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
            after_rename()
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
