"""``make bench``: every benchmark in its own subprocess, so each peak RSS is its own.

A benchmark is a function ``(quick: bool) -> list[dict]`` named in ``BENCHMARKS``; those in
``ON_DEVICE`` also take the torch device (``--device cuda`` measures them on a GPU). Each row it
returns is printed as one line (name, events/s, latency percentiles, peak RSS) and all rows are
written to ``bench-results.json``. ``python -m benchmarks.runner [--quick] [--device D] [NAME...]``
is ``recsys bench`` without the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.measure import machine, peak_rss_mib
from pipelines.report import format_table
from recsys.core.atomic import write_json
from recsys.core.errors import RecsysError

BENCHMARKS = (
    "prepare",
    "train",
    "train-readout",
    "train-load",
    "train-parallel",
    "evaluate",
    "serve",
    "serve-live",
    "accuracy",
    "scale",
)
ON_DEVICE = {"train", "accuracy"}  # the benchmarks that run on --device (the rest: CPU)
# only when named: a full Diginetica training (~14 min on 2 cores); the scale curves (100M
# events generated and prepared, 1M-item training: ~30 min, 1.3 GiB of logs in RECSYS_SCALE_DIR)
OPT_IN = {"accuracy", "scale"}
RESULTS = Path("bench-results.json")

Benchmark = Callable[..., list[dict[str, Any]]]


def benchmark(name: str) -> Benchmark:
    """The function of one benchmark, imported only here, in the child that runs it: a child
    loads its own benchmark's modules (torch, mlflow, ...) and no other's."""
    match name:
        case "prepare":
            from benchmarks.prepare import bench_prepare

            return bench_prepare
        case "train":
            from benchmarks.train import bench_train

            return bench_train
        case "train-readout":
            from benchmarks.train_readout import bench_train_readout

            return bench_train_readout
        case "train-load":
            from benchmarks.train_load import bench_train_load

            return bench_train_load
        case "train-parallel":
            from benchmarks.train_parallel import bench_train_parallel

            return bench_train_parallel
        case "evaluate":
            from benchmarks.evaluate import bench_evaluate

            return bench_evaluate
        case "serve":
            from benchmarks.serve import bench_serve

            return bench_serve
        case "serve-live":
            from benchmarks.serve_live import bench_serve_live

            return bench_serve_live
        case "accuracy":
            from benchmarks.accuracy import bench_accuracy

            return bench_accuracy
        case "scale":
            from benchmarks.scale import bench_scale

            return bench_scale
    raise RecsysError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def _run_one(name: str, quick: bool, device: str) -> list[dict[str, Any]]:
    """Run a benchmark in a child process; it prints its rows as JSON on the last line."""
    cmd = [sys.executable, "-m", "benchmarks.runner", "--child", name, "--device", device]
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
    from recsys.serving.mlflow_store import quiet_environment

    os.environ.setdefault("RECSYS_QUIET", "1")
    quiet_environment()
    func = benchmark(name)
    rows = func(quick, device) if name in ON_DEVICE else func(quick)
    for row in rows:
        row.setdefault("benchmark", name)
        row.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
    print(json.dumps(rows, default=str))


def main(args: list[str]) -> None:
    where = args[args.index("--device") + 1] if "--device" in args else "cpu"
    try:
        if args[:1] == ["--child"]:
            _child(args[1], "--quick" in args, where)
        else:
            names = [a for a in args if not a.startswith("--") and a != where]
            run_benchmarks(names, quick="--quick" in args, device=where)
    except RecsysError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
