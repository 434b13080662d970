"""The prepare step: raw click log -> prepared dataset, redone only when its inputs change."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.cache import config_key, read_marker, step_key
from pipelines.report import format_table
from pipelines.tracking import TAG_CACHED, TAG_DATA, Tracker
from recsys.config import Config
from recsys.core.errors import RecsysError
from recsys.core.progress import step
from recsys.data.preparation import PREPARATION_VERSION, prepare_events, write_prepared
from recsys.data.schema import (
    ITEMS_FILE,
    SPLITS,
    STATS_FILE,
    TEST,
    TRAIN,
    TRAIN_TR,
    VALID,
    split_file,
)
from recsys.data.sources import read_events
from recsys.data.streaming import prepare_streaming, resolve_engine

CACHE_KEY = "cache_key"  # the field of stats.json that holds the step key


def source_fingerprint(config: Config) -> str:
    """Cheap identity of the raw input: sizes and mtimes of the files (or the generator knobs)."""
    src = config.data.source
    parts: list[str] = [src.model_dump_json()]
    for p in src.paths:
        st = Path(p).stat() if Path(p).exists() else None
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}" if st else f"{p}:missing")
    return step_key(*parts)


def cache_key(config: Config) -> str:
    """The data config, the raw input and the protocol's version: what a prepared dataset is of."""
    named = {
        "version": PREPARATION_VERSION,
        "data": config_key(config, "data"),
        "source": source_fingerprint(config),
    }
    return step_key(json.dumps(named))


def cached_stats(config: Config) -> dict[str, Any] | None:
    """The statistics of the prepared dataset when it is complete and of the current inputs."""
    out = config.prepared_dir
    files = [out / split_file(name) for name in SPLITS] + [out / ITEMS_FILE]
    return read_marker(out / STATS_FILE, cache_key(config), needs=files, field=CACHE_KEY)


def check_workdir(config: Config) -> None:
    """The output folder can be made: no file where ``workdir`` or a folder in it should be."""
    for folder in (config.workdir, config.run_dir, config.prepared_dir):
        if folder.exists() and not folder.is_dir():
            raise RecsysError(f"workdir {config.workdir}: {folder} is a file, not a folder")
    for parent in config.workdir.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RecsysError(f"workdir {config.workdir}: {parent} is a file, not a folder")
            break


def is_up_to_date(config: Config) -> bool:
    """Whether ``prepare`` would skip the work."""
    return cached_stats(config) is not None


def prepare(config: Config, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Prepare the configured source into ``config.prepared_dir``; returns (stats, was_redone).

    Skipped when the output exists for the same data config and raw input, unless ``force``.
    """
    check_workdir(config)
    cached = None if force else cached_stats(config)
    if cached is not None:
        return cached, False
    start = time.perf_counter()
    origin = ", ".join(str(p) for p in config.data.source.paths) or config.data.source.format
    events, prep = read_events(config.data.source), config.data.preparation
    extra = {CACHE_KEY: cache_key(config)}
    if resolve_engine(prep.engine, config.data.source.paths) == "streaming":
        stats = prepare_streaming(events, prep, origin, config.prepared_dir, extra)
    else:
        stats = write_prepared(prepare_events(events, prep, origin), config.prepared_dir, extra)
    # Timing is returned to the caller but not written: stats.json must be reproducible.
    return stats | {"seconds": round(time.perf_counter() - start, 3)}, True


def run_prepare(config: Config, tracker: Tracker | None, force: bool = False) -> dict[str, Any]:
    with step(f"prepare [{config.name}]"):
        stats, redone = prepare(config, force=force)
    if tracker is not None:
        with tracker.step("prepare", ("data",)) as run:
            run.tags({TAG_DATA: stats["fingerprint"], TAG_CACHED: str(not redone).lower()})
            run.metrics(
                {
                    f"{split}.{key}": stats["splits"][split][key]
                    for split in (TRAIN, TEST, TRAIN_TR, VALID)
                    for key in ("events", "sessions", "items")
                }
                | {"test_predictions": stats["test_predictions"], "items": stats["items"]}
            )
            run.artifact(config.prepared_dir / STATS_FILE)
    print(stats_table(stats, cached=not redone))
    return stats


def stats_table(stats: dict[str, Any], cached: bool = False) -> str:
    rows = [
        {
            "split": name,
            "events": s["events"],
            "sessions": s["sessions"],
            "items": s["items"],
            "median len": s.get("session_length", {}).get("median", 0.0),
        }
        for name, s in stats["splits"].items()
    ]
    dropped = stats["dropped"]
    note = (
        f"dropped: {dropped['missing_values']:,} rows with missing values, "
        f"{dropped['consecutive_repeats']:,} consecutive repeats, "
        f"{dropped['short_sessions']:,} in short sessions, {dropped['rare_items']:,} of rare items, "
        f"{dropped.get('test_unknown_items', 0):,} test clicks on unknown items"
    )
    seen, last = stats["repeat_targets"], stats["last_item_targets"]
    repeats = (
        f"targets already in the session: test {seen['test']:.1%} ({last['test']:.1%} the item "
        f"just clicked), valid {seen['valid']:.1%} ({last['valid']:.1%})"
    )
    missing = dropped.get("missing_by_column", {})
    if any(missing.values()):
        note += " (missing: " + ", ".join(f"{c} {n:,}" for c, n in missing.items() if n) + ")"
    kinds = stats.get("id_types", {})
    ids = ", ".join(f"{c} {'integers' if k == 'int' else 'text'}" for c, k in kinds.items())
    head = "prepared dataset" + (" (up to date, not redone)" if cached else "")
    return "\n".join(
        [
            head,
            format_table(rows, ["split", "events", "sessions", "items", "median len"]),
            f"catalogue: {stats['items']:,} items; test predictions: {stats['test_predictions']:,}"
            + (f"; ids read as {ids}" if ids else ""),
            repeats,
            note,
        ]
    )
