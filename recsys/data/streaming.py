"""Preparation in bounded memory: the protocol of ``preparation`` over a log read in parts.

The raw log is streamed once (polars' streaming engine) into Parquet parts by a hash of the
session id, so every session lies whole in one part. Every per-session step (sort, de-dup,
length filter, time cut, restriction, ordering) then runs on one part at a time with the same
functions the in-memory path uses; what needs the whole log is a small aggregate (item counts,
the last time, the item sets, session lengths), summed over the parts. The splits are finally
ordered by session start across parts: each part's rows are cut into start-time ranges, each
range is sorted alone, and the ranges are streamed into one file. Memory is that of one part
(``bucket_events`` rows) plus the aggregates, whatever the log's size; the files are the
in-memory path's, byte for byte (tests/test_streaming.py).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import PreparationConfig
from recsys.core.atomic import atomic_directory, remove_stale, write_json
from recsys.core.errors import RecsysError, first_line
from recsys.core.progress import step
from recsys.data.parts import Parts, facts_of, item_counts, total_height, write_ordered
from recsys.data.preparation import (
    data_fingerprint,
    drop_consecutive_repeats,
    id_type,
    index_from_counts,
    shares_of,
    sort_events,
    write_table,
)
from recsys.data.schema import (
    ITEM,
    ITEMS_FILE,
    SESSION,
    SPLIT,
    STATS_FILE,
    SUPPORT,
    TEST,
    TIME,
    TRAIN,
    TRAIN_TR,
    VALID,
    split_file,
)
from recsys.data.splits import (
    check_split_mode,
    drop_short_sessions,
    given_cut,
    last_session_ids,
    restrict_to_items,
    session_order,
    split_time,
    time_cut,
)

BUCKET_EVENTS = 4_000_000  # rows per part: ~1 GiB of working memory in the per-part steps
_BUCKET = "__bucket"
SPLITS = (TRAIN, TEST, TRAIN_TR, VALID)


def _read_parts(
    events: pl.LazyFrame, prep: PreparationConfig, origin: str, root: Path, bucket_events: int
) -> tuple[Parts, dict[str, Any]]:
    """Count the raw rows and their missing values (one streaming pass), then stream the
    complete rows into parts by session hash (a second); row order is kept within a part,
    and each part is sorted and de-duplicated as it is gathered (``clean``)."""
    try:
        schema = events.collect_schema()
        check_split_mode(prep, SPLIT in schema.names(), origin)
        complete = pl.all_horizontal(pl.col(c).is_not_null() for c in (SESSION, ITEM, TIME))
        row = (
            events.select(
                pl.len().alias("__n"),
                complete.sum().alias("__complete"),
                *(pl.col(c).null_count() for c in (SESSION, ITEM, TIME)),
            )
            .collect(engine="streaming")
            .row(0, named=True)
        )
        n_raw, n_complete = int(row.pop("__n")), int(row.pop("__complete"))
        if n_raw == 0:
            raise RecsysError(f"{origin}: no events to prepare (the input has no rows)")
        n = max(1, math.ceil(n_complete / bucket_events))
        events.drop_nulls([SESSION, ITEM, TIME]).with_columns(
            (pl.col(SESSION).hash(seed=0) % n).alias(_BUCKET)
        ).sink_parquet(pl.PartitionBy(root / "raw", key=_BUCKET, include_key=False), mkdir=True)
    except pl.exceptions.PolarsError as exc:
        raise RecsysError(f"{origin}: could not read the events: {first_line(exc, 200)}") from None
    parts = Parts(root, n, schema)
    n_clean = 0
    for k in range(n):  # the partition's layout (key=value folders) -> one file per part
        files = sorted((root / "raw" / f"{_BUCKET}={k}").glob("*.parquet"))
        if files:
            raw = pl.concat([pl.read_parquet(f) for f in files])
            clean = sort_events(raw.lazy()).collect()
            del raw
            if prep.dedup_consecutive:
                clean = drop_consecutive_repeats(clean.lazy()).collect()
            parts.write("clean", k, clean)
            n_clean += clean.height
            del clean
    shutil.rmtree(root / "raw")
    info = {
        "raw_events": n_raw,
        "missing_values": n_raw - n_complete,
        "missing_by_column": {c: int(row[c]) for c in (SESSION, ITEM, TIME)},
        "id_types": {c: id_type(schema[c]) for c in (SESSION, ITEM)},
        "has_given_split": SPLIT in schema.names(),
        "consecutive_repeats": n_complete - n_clean,
        "after_cleaning": n_clean,
    }
    return parts, info


def _filter(
    parts: Parts, prep: PreparationConfig, before: int
) -> tuple[list[dict[str, int]], int, Any]:
    """The session-length and item-support filters to a fixed point, the counts of each round
    as ``filter_sessions_and_items`` records them; returns the rounds, the rows left and the
    last time."""
    min_len = prep.min_session_length
    facts = parts.map("clean", "f0", lambda f: drop_short_sessions(f, min_len))
    after_sessions = total_height(facts)
    rounds: list[dict[str, int]] = []
    r = 0
    while True:
        counts = item_counts(facts)
        kept = counts.filter(pl.col(SUPPORT) >= prep.min_item_support)[ITEM].implode()
        gone = [0]

        def step_fn(
            frame: pl.DataFrame, kept: pl.Series = kept, gone: list[int] = gone
        ) -> pl.DataFrame:
            known = frame.filter(pl.col(ITEM).is_in(kept))
            gone[0] += frame.height - known.height
            return drop_short_sessions(known, min_len)

        facts = parts.map(f"f{r}", f"f{r + 1}", step_fn)
        after = total_height(facts)
        after_items = after_sessions - gone[0]
        rounds.append(
            {
                "short_sessions": before - after_sessions + (after_items - after),
                "rare_items": gone[0],
            }
        )
        r += 1
        if after == before or not prep.iterate_filters:
            break
        before = after_sessions = after  # the next round's first length filter drops nothing
    (parts.root / f"f{r}").rename(parts.root / "filtered")
    times = [f["t_max"] for f in facts if f["t_max"] is not None]
    return rounds, after, max(times) if times else None


def _cut(
    parts: Parts,
    src: str,
    dst: str,
    held: str,
    cut: Callable[[pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Apply a split's per-session half to every part: ``dst`` and ``held`` (not yet
    restricted to the items of ``dst``); returns ``dst``'s facts and the summed drops."""
    drops: dict[str, int] = {}
    facts = []
    for k in range(parts.n):
        kept, held_out, dropped = cut(parts.read(src, k))
        parts.write(dst, k, kept)
        parts.write(held, k, held_out)
        facts.append(facts_of(kept))
        for key, v in dropped.items():
            drops[key] = drops.get(key, 0) + v
    return facts, drops


def _restrict(
    parts: Parts, held: str, dst: str, items: pl.Series, min_len: int, name: str
) -> dict[str, int]:
    drops: dict[str, int] = {}
    for k in range(parts.n):
        kept, dropped = restrict_to_items(parts.read(held, k), items, min_len, name)
        parts.write(dst, k, kept)
        for key, v in dropped.items():
            drops[key] = drops.get(key, 0) + v
    parts.drop(held)
    return drops


def _split(
    parts: Parts, prep: PreparationConfig, t_max: Any, origin: str
) -> tuple[pl.DataFrame, dict[str, Any], dict[str, int]]:
    """Train/test and train_tr/valid as ``prepare_events`` splits them; returns the item index,
    the split times and the drops."""
    min_len = prep.min_session_length
    times: dict[str, Any] = {"t_split": None, "t_split_valid": None}
    if prep.split == "given":
        facts, drops = _cut(parts, "filtered", TRAIN, "test_all", lambda f: given_cut(f, min_len))
    else:
        t_split = split_time(t_max, prep)
        times["t_split"] = t_split
        facts, drops = _cut(
            parts, "filtered", TRAIN, "test_all", lambda f: time_cut(f, t_split, min_len)
        )
    if total_height(facts) == 0:
        raise RecsysError(f"{origin}: the train split is empty (split time {times['t_split']})")
    items = index_from_counts(item_counts(facts))
    drops |= _restrict(parts, "test_all", TEST, items[ITEM], min_len, "test")
    if prep.split == "given":
        order = session_order(
            pl.concat([parts.read(TRAIN, k).select(SESSION, TIME) for k in range(parts.n)])
        )
        ids = last_session_ids(order, prep.valid_fraction).implode()
        tr_facts, _ = _cut(
            parts,
            TRAIN,
            TRAIN_TR,
            "valid_all",
            lambda f: (
                f.filter(~pl.col(SESSION).is_in(ids)),
                f.filter(pl.col(SESSION).is_in(ids)),
                {},
            ),
        )
    else:
        times["t_split_valid"] = times["t_split"] - timedelta(days=prep.test_days)
        tr_facts, _ = _cut(
            parts,
            TRAIN,
            TRAIN_TR,
            "valid_all",
            lambda f: time_cut(f, times["t_split_valid"], min_len),
        )
    tr_items = item_counts(tr_facts)[ITEM]
    drops |= _restrict(parts, "valid_all", VALID, tr_items, min_len, "valid")
    return items, times, drops


AUTO_STREAMING_BYTES = 256 * 2**20  # raw files this large are prepared in parts


def resolve_engine(engine: str, paths: list[str]) -> str:
    """``auto``: streaming when the raw files together reach ``AUTO_STREAMING_BYTES`` (the
    in-memory path needs ~200 bytes per event, ~10x a CSV's size), else memory."""
    if engine != "auto":
        return engine
    size = sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
    return "streaming" if size >= AUTO_STREAMING_BYTES else "memory"


def prepare_streaming(
    events: pl.LazyFrame,
    prep: PreparationConfig,
    origin: str,
    directory: Path,
    extra_stats: dict[str, Any] | None = None,
    bucket_events: int = BUCKET_EVENTS,
) -> dict[str, Any]:
    """``prepare_events`` + ``write_prepared`` in bounded memory: the same files and
    ``stats.json``, written atomically into ``directory``; returns the statistics."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)  # a killed run's work folder too (named like atomic writes)
    work = f".{directory.name}.{os.getpid()}-stream-"
    with tempfile.TemporaryDirectory(prefix=work, suffix=".tmp", dir=directory.parent) as w:
        root = Path(w)
        with step("  reading into parts, sorting and cleaning"):
            parts, info = _read_parts(events, prep, origin, root, bucket_events)
        dropped: dict[str, Any] = {
            "missing_values": info["missing_values"],
            "missing_by_column": info["missing_by_column"],
        }
        dropped["consecutive_repeats"] = info["consecutive_repeats"]
        counts = {"raw_events": info["raw_events"], "after_cleaning": info["after_cleaning"]}
        with step("  filtering sessions and items"):
            rounds, counts["after_filters"], t_max = _filter(parts, prep, counts["after_cleaning"])
        dropped["filter_rounds"] = rounds
        dropped["short_sessions"] = sum(r["short_sessions"] for r in rounds)
        dropped["rare_items"] = sum(r["rare_items"] for r in rounds)
        if counts["after_filters"] == 0:
            raise RecsysError(
                f"{origin}: every event was filtered away (min_session_length="
                f"{prep.min_session_length}, min_item_support={prep.min_item_support}); "
                f"{counts['raw_events']} raw events, {dropped['missing_values']} with missing "
                f"values"
            )
        with step("  splitting"):
            items, times, split_drops = _split(parts, prep, t_max, origin)
        dropped.update(split_drops)
        if not any(parts.read(TEST, k).height for k in range(parts.n)):
            raise RecsysError(
                f"{origin}: the test split is empty after dropping unknown items and short "
                f"sessions (split time {times['t_split']}); lengthen data.preparation.test_days "
                f"or check the log's time span"
            )
        with step("  ordering and writing"), atomic_directory(directory) as tmp:
            done = {
                name: write_ordered(parts, items, name, tmp / split_file(name)) for name in SPLITS
            }
            write_table(items, tmp / ITEMS_FILE)
            stats = _stats(info, prep, origin, times, counts, dropped, done, items.height)
            stats |= extra_stats or {}
            stats["fingerprint"] = data_fingerprint(tmp)
            write_json(tmp / STATS_FILE, stats)
    return stats


def _stats(
    info: dict[str, Any],
    prep: PreparationConfig,
    origin: str,
    times: dict[str, Any],
    counts: dict[str, int],
    dropped: dict[str, Any],
    done: dict[str, Any],
    n_items: int,
) -> dict[str, Any]:
    """``stats.json`` as ``prepare_events`` writes it, from the summed parts."""
    stats: dict[str, Any] = {
        "source": origin,
        "id_types": info["id_types"],
        "timestamps": not info["has_given_split"],
        "split": {
            "method": prep.split,
            "t_split": str(times["t_split"]) if times["t_split"] else None,
            "t_split_valid": str(times["t_split_valid"]) if times["t_split_valid"] else None,
        },
        "counts": counts,
        "dropped": dropped,
        "splits": {name: done[name]["summary"] for name in SPLITS},
        "items": n_items,
        "test_predictions": done[TEST]["predictions"],
        "valid_predictions": done[VALID]["predictions"],
    }
    shares = {name: shares_of(*done[name]["repeat"]) for name in (TEST, VALID)}
    stats["repeat_targets"] = {name: seen for name, (seen, _) in shares.items()}
    stats["last_item_targets"] = {name: last for name, (_, last) in shares.items()}
    if not stats["timestamps"]:
        for summary in stats["splits"].values():
            summary.pop("time_min", None)
            summary.pop("time_max", None)
    return stats
