"""How many intra-op threads training uses: ``train.threads``, where 0 leaves one core free.

torch's default is one intra-op thread per core. Beside one other busy process that pool waits
at every operator for the thread whose core the other process holds (measured on the shared
2-core machine, ``make bench``'s ``train-load`` case: 2 threads ran at 410-612 events/s, one
thread at 2,987-4,064). So ``threads: 0`` takes one thread fewer than the usable cores (at
least one): one competing process then finds a core of its own.
"""

from __future__ import annotations

import os

import torch


def default_threads() -> int:
    """What ``train.threads: 0`` means here: the usable cores less one, at least one; with
    N data-parallel processes on this machine (``LOCAL_WORLD_SIZE``, set by torchrun and by
    ``train.nproc``) each takes cores // N, so the ranks do not wait on each other's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        return max(1, cores // local)
    return max(1, cores - 1)


def apply_threads(threads: int) -> int:
    """Set torch's intra-op thread count for training (0: ``default_threads``); returns it."""
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count
