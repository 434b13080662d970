"""``make bench``: every benchmark in its own subprocess, so each peak RSS is its own.

A benchmark is a function ``(quick: bool) -> list[dict]`` in one of the ``pipelines.bench_*``
modules, registered in ``BENCHMARKS``; those in ``ON_DEVICE`` also take the torch device
(``--device cuda`` measures them on a GPU). Each row it returns is printed as one line (name,
events/s, latency percentiles, peak RSS) and all rows are written to ``bench-results.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.report import format_table
from recsys.core.atomic import write_json

BENCHMARKS: dict[str, str] = {
    "prepare": "pipelines.bench_prepare:bench_prepare",
    "train": "pipelines.bench_train:bench_train",
    "evaluate": "pipelines.bench_evaluate:bench_evaluate",
    "serve": "pipelines.bench_serve:bench_serve",
    "accuracy": "pipelines.bench_accuracy:bench_accuracy",
}
ON_DEVICE = {"train", "accuracy"}  # the benchmarks that run on --device (the rest: CPU)
OPT_IN = {"accuracy"}  # a full Diginetica training (~14 min on 2 cores): only when named
RESULTS = Path("bench-results.json")


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
    import numpy as np

    arr = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p90_ms": round(float(np.percentile(arr, 90)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
    }


def _run_one(name: str, quick: bool, device: str) -> list[dict[str, Any]]:
    """Run a benchmark in a child process; it prints its rows as JSON on the last line."""
    cmd = [sys.executable, "-m", "pipelines.bench", "--child", name, "--device", device]
    cmd += ["--quick"] if quick else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return [
            {
                "benchmark": name,
                "error": " | ".join(tail),
                "wall_s": round(time.perf_counter() - start, 1),
            }
        ]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmarks(
    only: list[str], quick: bool = False, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Run the named benchmarks (default: all but the opt-in ones) and print one table.

    ``device`` ("cpu", "cuda" or "auto") is where the ``ON_DEVICE`` benchmarks run; with a GPU,
    only those run, and naming another is an error rather than a CPU number under a GPU label.
    """
    from recsys.core.errors import RecsysError
    from recsys.training.trainer import resolve_device

    device = resolve_device(device, "--device").type
    default = [n for n in BENCHMARKS if n not in OPT_IN and (device == "cpu" or n in ON_DEVICE)]
    names = only or default
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise RecsysError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    off_device = [n for n in names if device != "cpu" and n not in ON_DEVICE]
    if off_device:
        raise RecsysError(
            f"benchmark(s) {off_device} run on the CPU only; --device {device} applies to "
            f"{', '.join(sorted(ON_DEVICE))}"
        )
    print(f"machine: {machine(device)}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        print(f"running {name} on {device} ...", flush=True)
        got = _run_one(name, quick, device)
        rows += got
        for row in got:
            print("  " + json.dumps(row), flush=True)
    columns = ["benchmark", "case", "events_per_s", "p50_ms", "p99_ms", "peak_rss_mib", "note"]
    if any("peak_gpu_mib" in r for r in rows):
        columns.insert(-1, "peak_gpu_mib")
    print()
    print(format_table(rows, columns))
    write_json(
        RESULTS, {"machine": machine(device), "device": device, "quick": quick, "rows": rows}
    )
    print(f"\nall numbers: {RESULTS}")
    return rows


def _child(name: str, quick: bool, device: str) -> None:
    module_name, func_name = BENCHMARKS[name].split(":")
    import importlib

    os.environ.setdefault("RECSYS_QUIET", "1")
    func = getattr(importlib.import_module(module_name), func_name)
    rows = func(quick, device) if name in ON_DEVICE else func(quick)
    for row in rows:
        row.setdefault("benchmark", name)
        row.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    args = sys.argv[1:]
    where = args[args.index("--device") + 1] if "--device" in args else "cpu"
    if args[:1] == ["--child"]:
        _child(args[1], "--quick" in args, where)
    else:
        names = [a for a in args if not a.startswith("--") and a != where]
        run_benchmarks(names, quick="--quick" in args, device=where)
