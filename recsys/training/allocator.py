"""Keep freed memory in the process during CPU training (glibc's malloc only).

A training step allocates and frees the same ~20 MB of temporaries (gathered item rows, their
gradients, score matrices) every few milliseconds. glibc returns the freed top of its heap to
the kernel once it exceeds a trim threshold, and serves blocks above its mmap threshold with
fresh mappings, so the next step faults every page in again: measured inside ``make pipeline``
on Diginetica, 3,500–4,400 page faults and ~4 ``brk`` calls per step, half the CPU time in
the kernel. Raising both thresholds keeps those pages mapped; the cost is that the process keeps
its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit: tensors up to 32 MB reuse heap
TRIM_THRESHOLD = 1024 * 1024 * 1024  # give freed heap back only above 1 GB


@cache
def retain_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once per process; False where it does not apply
    (another C library or OS), which only costs speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
