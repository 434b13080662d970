"""What every benchmark reports besides its own numbers: the machine, peak memory, percentiles."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path


def machine(device: str = "cpu") -> str:
    """One line naming the machine the numbers came from (and the GPU, when one is used)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    line = (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        line += (
            f"; GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    return line


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib() -> float:
    """Peak GPU memory torch allocated in this process (since the last reset of its stats)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50, p90 and p99 of latencies in milliseconds, rounded to the microsecond."""
    import numpy as np

    arr = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p90_ms": round(float(np.percentile(arr, 90)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
    }
