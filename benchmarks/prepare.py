"""Preparation throughput on a large click log (10M events; 1M with ``--quick``).

The log is generated with numpy in a second or two (power-law item popularity, geometric session
lengths, session starts over 30 days, exponential think-times), written to Parquet and read back
through a ``table`` source, so the number covers what a user waits for: reading, the whole
protocol (cleaning, iterated filters, time split, train_tr/valid, item index, statistics) and
writing the prepared dataset. Generation is not timed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import config_from_dict
from recsys.data.preparation import prepare_events, write_prepared
from recsys.data.sources import read_events

N_ITEMS = 200_000
MEAN_SESSION_LENGTH = 5.0
DAYS = 30
MEAN_GAP_S = 60.0
START = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC, in ms


def synthetic_log(
    n_events: int,
    seed: int = 0,
    n_items: int = N_ITEMS,
    start_ms: int = START,
    days: float = DAYS,
    first_session: int = 1,
    exponent: float = 0.9,
) -> pl.DataFrame:
    """About ``n_events`` clicks: ``session``, ``item``, ``ts`` (epoch ms), in time order.

    Item ids depend on ``n_items`` only (not on ``seed``), so logs written in chunks with other
    seeds, start times and first session ids (benchmarks/scale.py) share one catalogue."""
    rng = np.random.default_rng(seed)
    n_sessions = int(n_events / MEAN_SESSION_LENGTH)
    lengths = rng.geometric(1.0 / MEAN_SESSION_LENGTH, n_sessions)
    total = int(lengths.sum())
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(popularity)
    items = np.searchsorted(cdf, rng.random(total) * cdf[-1]).astype(np.int64)
    ids = np.random.default_rng(n_items).permutation(n_items)
    item_ids = ids.astype(np.int64) * 7 + 1_000_000  # not 0..n-1
    starts = np.sort(rng.integers(0, int(days * 86_400_000), n_sessions))
    gaps = rng.exponential(MEAN_GAP_S * 1000, total).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    gaps[offsets] = 0
    within = np.cumsum(gaps)
    within -= np.repeat(within[offsets], lengths)
    ts = start_ms + np.repeat(starts, lengths) + within
    order = np.argsort(ts, kind="stable")  # a log is recorded in time order: sessions interleave
    return pl.DataFrame(
        {
            "session": np.repeat(
                np.arange(first_session, first_session + n_sessions, dtype=np.int64), lengths
            )[order],
            "item": item_ids[items][order],
            "ts": ts[order],
        }
    )


def log_config(log: Path, workdir: Path, name: str, engine: str | None = None) -> Any:
    """The run config of a ``synthetic_log`` written to ``log`` (its columns, ms timestamps,
    the last day as test); ``engine`` sets ``data.preparation.engine`` (None: the default)."""
    preparation: dict[str, Any] = {"test_days": 1}
    if engine is not None:
        preparation["engine"] = engine
    return config_from_dict(
        {
            "name": name,
            "workdir": str(workdir),
            "data": {
                "source": {
                    "format": "table",
                    "path": str(log),
                    "columns": {"session_id": "session", "item_id": "item", "timestamp": "ts"},
                    "timestamp_unit": "ms",
                },
                "preparation": preparation,
            },
        }
    )


def bench_prepare(quick: bool) -> list[dict[str, Any]]:
    """Seconds and events/s of reading + preparing a 10M-event log (1M in quick mode)."""
    n_target = 1_000_000 if quick else 10_000_000
    with tempfile.TemporaryDirectory(prefix="recsys-bench-prepare-") as tmp:
        log = Path(tmp) / "clicks.parquet"
        t0 = time.perf_counter()
        frame = synthetic_log(n_target)
        n_events = frame.height
        frame.write_parquet(log)
        del frame
        generate_s = time.perf_counter() - t0
        config = log_config(log, Path(tmp) / "work", "bench")
        start = time.perf_counter()
        dataset = prepare_events(read_events(config.data.source), config.data.preparation, "bench")
        seconds = time.perf_counter() - start
        write_start = time.perf_counter()
        write_prepared(dataset, config.prepared_dir)
        write_s = time.perf_counter() - write_start
        stats = dataset.stats
    label = f"{n_target // 1_000_000}M"
    return [
        {
            "case": f"prepare {label} events",
            "events_per_s": round(n_events / seconds),
            "seconds": round(seconds, 2),
            "events": n_events,
            "note": (
                f"read Parquet + whole protocol; writing the prepared dataset +{write_s:.1f}s; "
                f"{stats['items']:,} items, {stats['splits']['train']['events']:,} train / "
                f"{stats['splits']['test']['events']:,} test events, "
                f"{len(stats['dropped']['filter_rounds'])} filter rounds; "
                f"log generated in {generate_s:.1f}s (not timed)"
            ),
        }
    ]
