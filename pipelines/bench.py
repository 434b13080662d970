"""``make bench``: every benchmark in its own subprocess, so each peak RSS is its own.

A benchmark is a function ``(quick: bool) -> list[dict]`` in one of the ``pipelines.bench_*``
modules, registered in ``BENCHMARKS``. Each row it returns is printed as one line (name,
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
from recsys.atomic import write_json

BENCHMARKS: dict[str, str] = {
    "prepare": "pipelines.bench_prepare:bench_prepare",
    "train": "pipelines.bench_train:bench_train",
    "evaluate": "pipelines.bench_evaluate:bench_evaluate",
    "serve": "pipelines.bench_serve:bench_serve",
}
RESULTS = Path("bench-results.json")


def machine() -> str:
    """One line naming the machine the numbers came from."""
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
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p90_ms": round(float(np.percentile(arr, 90)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
    }


def _run_one(name: str, quick: bool) -> list[dict[str, Any]]:
    """Run a benchmark in a child process; it prints its rows as JSON on the last line."""
    cmd = [sys.executable, "-m", "pipelines.bench", "--child", name] + (
        ["--quick"] if quick else []
    )
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


def run_benchmarks(only: list[str], quick: bool = False) -> list[dict[str, Any]]:
    names = only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        from recsys.errors import RecsysError

        raise RecsysError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    print(f"machine: {machine()}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        print(f"running {name} ...", flush=True)
        got = _run_one(name, quick)
        rows += got
        for row in got:
            print("  " + json.dumps(row), flush=True)
    columns = ["benchmark", "case", "events_per_s", "p50_ms", "p99_ms", "peak_rss_mib", "note"]
    print()
    print(format_table(rows, columns))
    write_json(RESULTS, {"machine": machine(), "quick": quick, "rows": rows})
    print(f"\nall numbers: {RESULTS}")
    return rows


def _child(name: str, quick: bool) -> None:
    module_name, func_name = BENCHMARKS[name].split(":")
    import importlib

    os.environ.setdefault("RECSYS_QUIET", "1")
    func = getattr(importlib.import_module(module_name), func_name)
    rows = func(quick)
    for row in rows:
        row.setdefault("benchmark", name)
        row.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        _child(args[1], "--quick" in args)
    else:
        run_benchmarks([a for a in args if not a.startswith("--")], quick="--quick" in args)
