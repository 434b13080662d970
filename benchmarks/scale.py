"""Scale: what preparation costs as the log grows, and what training costs as the catalogue grows.

``prepare``: a power-law log of 1M / 10M / 30M / 100M events (``--quick``: 1M), generated in
chunks (never whole in memory) into one Parquet file, then prepared through a ``table`` source
by ``recsys.data.streaming`` in a child process of its own, so its peak RSS is its own; the
in-memory engine is measured beside it up to 10M events. Logs are kept in ``RECSYS_SCALE_DIR``
(default: a temporary folder) so a rerun does not generate them again. Generation is not timed.

``train``: GRU4Rec setting (a) for a fixed number of steps on catalogues of 43k / 250k / 1M
items (a flatter power law, so most items are clicked), with the training state's bytes per
item, then one evaluation batch and one recommend call over the whole catalogue.

``python -m benchmarks.scale [prepare|train] [--quick]`` runs one half alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.measure import peak_rss_mib
from benchmarks.prepare import log_config, synthetic_log

PREP_EVENTS = (1_000_000, 10_000_000, 30_000_000, 100_000_000)
MEMORY_UP_TO = 10_000_000  # the in-memory engine needs ~200 B/event: measured up to here
CHUNK_EVENTS = 5_000_000
LOG_ITEMS = 1_000_000
DAYS = 30.0
START_MS = 1_700_000_000_000


def write_log(path: Path, n_events: int, n_items: int = LOG_ITEMS) -> int:
    """About ``n_events`` clicks in chunks of ``CHUNK_EVENTS`` (each its own days and
    sessions, in time order), appended to one Parquet file; returns the events written."""
    n_chunks = max(1, round(n_events / CHUNK_EVENTS))
    days = DAYS / n_chunks
    tmp = path.with_suffix(".partial")
    writer = None
    total, first = 0, 1
    try:
        for c in range(n_chunks):
            chunk = synthetic_log(
                n_events // n_chunks,
                seed=c,
                n_items=n_items,
                start_ms=START_MS + int(c * days * 86_400_000),
                days=days,
                first_session=first,
            )
            first = int(chunk["session"].max()) + 1
            table = chunk.to_arrow()
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            total += chunk.height
            del chunk, table
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return total


def prepare_child(log: Path, engine: str, workdir: Path) -> dict[str, Any]:
    """One preparation as ``recsys prepare`` runs it (read, protocol, write), in this process."""
    from pipelines.prepare import prepare

    start = time.perf_counter()
    stats, _ = prepare(log_config(log, workdir, "scale", engine), force=True)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "events": stats["counts"]["raw_events"],
        "items": stats["items"],
        "train_events": stats["splits"]["train"]["events"],
        "rounds": len(stats["dropped"]["filter_rounds"]),
        "fingerprint": stats["fingerprint"],
    }


def _in_child(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_prepare_scale(quick: bool) -> list[dict[str, Any]]:
    """Seconds and peak RSS of preparing each log size, per engine."""
    keep = os.environ.get("RECSYS_SCALE_DIR")
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="recsys-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in PREP_EVENTS[:1] if quick else PREP_EVENTS:
        log = folder / f"clicks-{n // 1_000_000}M.parquet"
        if not log.exists():
            write_log(log, n)
        engines = ["streaming"] + (["memory"] if n <= MEMORY_UP_TO else [])
        for engine in engines:
            got = _in_child("prepare", str(log), engine, str(folder / f"work-{engine}"))
            label = f"prepare {n // 1_000_000}M events ({engine})"
            if "error" in got:
                rows.append({"case": label, "note": got["error"]})
                continue
            rows.append(
                {
                    "case": label,
                    "events_per_s": round(got["events"] / got["seconds"]),
                    "seconds": got["seconds"],
                    "peak_rss_mib": got["peak_rss_mib"],
                    "events": got["events"],
                    "note": (
                        f"{got['items']:,} items, {got['train_events']:,} train events, "
                        f"{got['rounds']} filter rounds; fingerprint {got['fingerprint'][:12]}"
                    ),
                }
            )
    if not keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_scale(quick: bool) -> list[dict[str, Any]]:
    """``make bench``'s scale rows: the preparation curve, then the catalogue curve."""
    from benchmarks.scale_items import bench_items

    return bench_prepare_scale(quick) + bench_items(quick)


def main(args: list[str]) -> None:
    if args[:1] == ["--child"]:
        kind, *rest = args[1:]
        if kind == "prepare":
            os.environ.setdefault("RECSYS_QUIET", "1")
            out = prepare_child(Path(rest[0]), rest[1], Path(rest[2]))
        else:
            from benchmarks.scale_items import items_child

            out = items_child(int(rest[0]), "--quick" in rest)
        print(json.dumps(out, default=str))
        return
    quick = "--quick" in args
    names = [a for a in args if not a.startswith("--")] or ["prepare", "train"]
    rows = []
    if "prepare" in names:
        rows += bench_prepare_scale(quick)
    if "train" in names:
        from benchmarks.scale_items import bench_items

        rows += bench_items(quick)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
