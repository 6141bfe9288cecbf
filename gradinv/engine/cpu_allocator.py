"""Freed tensor memory kept in the process (glibc's malloc), for inversions on a CPU.

Each iteration frees and allocates again the same tensors, up to megabytes each (on the
default CPU problem the 9 MB weight gradients of ResNet-18's last stage). By default glibc
hands a freed block that large back to the kernel, and the next iteration's allocation
page-faults it in again, zeroed, page by page; with the limits below such blocks stay in the
process and are reused. Measured on the project's 2-core machine (`python
benchmarks/step_speed.py`, docs/step_speed.md): the default step with one seed 1.11x faster,
with seeds on threads no change; the straightforward step 1.13x to 1.31x."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: allocations above it still get their own mapping
TRIM_THRESHOLD = 512 * 2**20  # free memory kept at the top of each heap before it goes back


@functools.cache
def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds for the rest of the process (once: the default,
    self-adjusting threshold cannot be restored). True where applied; False, changing nothing,
    where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
