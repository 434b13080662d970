"""Preparation: raw events -> filtered, time-split dataset with an item index (DESIGN §2).

Every step is a polars expression over the whole table; the only loop is the fixed-point
iteration of the session-length and item-support filters (the splits are in
``recsys.data.splits``). A prepared dataset is written atomically as a directory of Parquet
files plus ``stats.json``, which records counts at every step and why rows were dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import PreparationConfig
from recsys.core.atomic import atomic_directory, write_json
from recsys.core.errors import RecsysError, first_line
from recsys.core.fingerprint import digest
from recsys.core.progress import step
from recsys.data.schema import (
    ITEM,
    ITEM_IDX,
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
    given_split,
    last_sessions_split,
    session_start,
    split_time,
    time_split,
)

PREPARATION_VERSION = (
    5  # bump when the protocol, the readers or stats.json change: cached outputs are redone
)
ROW_GROUP = 131_072  # rows per Parquet row group of every prepared file (both engines)


@dataclass(frozen=True)
class PreparedDataset:
    """The four splits (events with ``item_idx``), the item index and the statistics."""

    train: pl.DataFrame
    test: pl.DataFrame
    train_tr: pl.DataFrame
    valid: pl.DataFrame
    items: pl.DataFrame
    stats: dict[str, Any]

    @property
    def n_items(self) -> int:
        return self.items.height

    def split(self, name: str) -> pl.DataFrame:
        return {TRAIN: self.train, TEST: self.test, TRAIN_TR: self.train_tr, VALID: self.valid}[
            name
        ]


# --- the protocol, one function per step ------------------------------------------------------
#
# After ``sort_events`` every session is one contiguous run of rows in time order, and every
# later step only filters rows or reorders whole sessions, so that stays true; the per-session
# expressions of ``recsys.data.splits`` rely on it.


def _summary(events: pl.DataFrame) -> dict[str, Any]:
    if events.height == 0:
        return {"events": 0, "sessions": 0, "items": 0}
    return summary_of(
        events.height,
        events[SESSION].rle().struct.field("len"),
        events[ITEM].n_unique(),
        (events[TIME].min(), events[TIME].max()),
    )


def summary_of(
    n_events: int, lengths: pl.Series, n_items: int, span: tuple[Any, Any]
) -> dict[str, Any]:
    """A split's statistics from its parts: the session lengths (in any order), the number of
    distinct items, the first and last time; a log read in parts gives the same figures."""
    if n_events == 0:
        return {"events": 0, "sessions": 0, "items": 0}
    return {
        "events": n_events,
        "sessions": lengths.len(),
        "items": n_items,
        "time_min": str(span[0]),
        "time_max": str(span[1]),
        "session_length": {
            "min": int(lengths.min()),  # type: ignore[arg-type]
            "p25": float(lengths.quantile(0.25) or 0),
            "median": float(lengths.median() or 0),
            "p75": float(lengths.quantile(0.75) or 0),
            "p95": float(lengths.quantile(0.95) or 0),
            "max": int(lengths.max()),  # type: ignore[arg-type]
            "mean": round(float(lengths.mean() or 0), 4),
        },
    }


def repeat_target_counts(events: pl.DataFrame) -> tuple[int, int, int]:
    """(targets, targets already in the prefix, targets equal to the item just clicked): the
    sums behind ``repeat_target_shares``, additive over parts that hold whole sessions."""
    targets = events.height - events[SESSION].n_unique()
    if targets == 0:
        return 0, 0, 0
    seen, last = events.select(
        (pl.int_range(pl.len()).over(SESSION, ITEM) > 0).sum(),
        ((pl.col(ITEM) == pl.col(ITEM).shift(1)) & (pl.col(SESSION) == pl.col(SESSION).shift(1)))
        .fill_null(False)
        .sum(),
    ).row(0)
    return targets, int(seen), int(last)


def repeat_target_shares(events: pl.DataFrame) -> tuple[float, float]:
    """Of a split's next-item targets (every click but a session's first), the share whose item
    is already in the session prefix, and the share that is the item just clicked.

    How repeat-heavy a log is decides whether the session's own items beat the catalogue (S-POP
    against GRU4Rec), so it is reported with the data. Rows must be in session-time order.
    """
    return shares_of(*repeat_target_counts(events))


def shares_of(targets: int, seen: int, last: int) -> tuple[float, float]:
    return (0.0, 0.0) if targets == 0 else (round(seen / targets, 4), round(last / targets, 4))


def id_type(dtype: pl.DataType) -> str:
    """The id kind stats.json states: integers, or text (the readers decide, once)."""
    return "int" if dtype.is_integer() else "str"


def sort_events(events: pl.LazyFrame) -> pl.LazyFrame:
    """Stable sort by (session, time): ties keep file order, as the click log recorded them."""
    return events.sort([SESSION, TIME], maintain_order=True)


def drop_consecutive_repeats(events: pl.LazyFrame) -> pl.LazyFrame:
    """Collapse runs of the same item within a session (a reload is not a new intent)."""
    repeat = (pl.col(ITEM) == pl.col(ITEM).shift(1)) & (pl.col(SESSION) == pl.col(SESSION).shift(1))
    return events.filter(~repeat.fill_null(False))


def filter_sessions_and_items(
    events: pl.DataFrame, min_length: int, min_support: int, iterate: bool
) -> tuple[pl.DataFrame, list[dict[str, int]]]:
    """Drop short sessions and rare items, repeated until nothing changes (or once).

    Each filter is its own eager step: support is counted after short sessions are gone.
    """
    rounds: list[dict[str, int]] = []
    while True:
        before = events.height
        events = drop_short_sessions(events, min_length)
        after_sessions = events.height
        events = events.filter(pl.len().over(ITEM) >= min_support)
        after_items = events.height
        events = drop_short_sessions(events, min_length)
        rounds.append(
            {
                "short_sessions": before - after_sessions + (after_items - events.height),
                "rare_items": after_sessions - after_items,
            }
        )
        if events.height == before or not iterate:
            return events, rounds


def order_by_session_start(events: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by (session start, session, time): each session contiguous, oldest first."""
    return (
        events.with_columns(pl.col(TIME).min().over(SESSION).alias("__start"))
        .sort(["__start", SESSION, TIME], maintain_order=True)
        .drop("__start")
    )


def _ordered_by_start(events: pl.DataFrame) -> pl.DataFrame:
    """``order_by_session_start`` for contiguous, time-ordered sessions (no hashing)."""
    return (
        events.with_columns(session_start().alias("__start"))
        .sort(["__start", SESSION, TIME], maintain_order=True)
        .drop("__start")
    )


def build_item_index(train: pl.DataFrame) -> pl.DataFrame:
    """Contiguous ``item_idx`` over train items, ordered by raw id (stable across reruns)."""
    return index_from_counts(train.group_by(ITEM).len(name=SUPPORT))


def index_from_counts(counts: pl.DataFrame) -> pl.DataFrame:
    """The item index from per-item click counts (``item_id``, ``support``), one row per item."""
    return (
        counts.sort(ITEM)
        .with_row_index(ITEM_IDX)
        .with_columns(pl.col(ITEM_IDX).cast(pl.Int64), pl.col(SUPPORT).cast(pl.Int64))
        .select(ITEM_IDX, ITEM, SUPPORT)
    )


def attach_index(events: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    return events.join(items.select(ITEM, ITEM_IDX), on=ITEM, how="inner", maintain_order="left")


# --- the whole step ---------------------------------------------------------------------------


def prepare_events(events: pl.LazyFrame, prep: PreparationConfig, origin: str) -> PreparedDataset:
    """Run the protocol on canonical events (in memory); no file is written here."""
    dropped: dict[str, Any] = {}
    counts: dict[str, int] = {}
    with step("  reading and sorting"):
        try:
            has_given_split = SPLIT in events.collect_schema().names()
            check_split_mode(prep, has_given_split, origin)
            raw = events.collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            raise RecsysError(
                f"{origin}: could not read the events: {first_line(exc, 200)}"
            ) from None
        counts["raw_events"] = raw.height
        if raw.height == 0:
            raise RecsysError(f"{origin}: no events to prepare (the input has no rows)")
        complete = raw.drop_nulls([SESSION, ITEM, TIME])
        dropped["missing_values"] = raw.height - complete.height
        dropped["missing_by_column"] = {c: raw[c].null_count() for c in (SESSION, ITEM, TIME)}
        id_types = {c: id_type(raw.schema[c]) for c in (SESSION, ITEM)}
        del raw
        ordered = sort_events(complete.lazy()).collect(engine="streaming")
        del complete
    if prep.dedup_consecutive:
        deduped = drop_consecutive_repeats(ordered.lazy()).collect(engine="streaming")
        dropped["consecutive_repeats"] = ordered.height - deduped.height
    else:
        deduped = ordered
        dropped["consecutive_repeats"] = 0
    del ordered
    counts["after_cleaning"] = deduped.height
    with step("  filtering sessions and items"):
        filtered, rounds = filter_sessions_and_items(
            deduped, prep.min_session_length, prep.min_item_support, prep.iterate_filters
        )
    del deduped
    dropped["filter_rounds"] = rounds
    dropped["short_sessions"] = sum(r["short_sessions"] for r in rounds)
    dropped["rare_items"] = sum(r["rare_items"] for r in rounds)
    counts["after_filters"] = filtered.height
    if filtered.height == 0:
        raise RecsysError(
            f"{origin}: every event was filtered away (min_session_length="
            f"{prep.min_session_length}, min_item_support={prep.min_item_support}); "
            f"{counts['raw_events']} raw events, {dropped['missing_values']} with missing values"
        )

    with step("  splitting"):
        t_split: datetime | None = None
        t_split_valid: datetime | None = None
        if prep.split == "given":
            train, test, split_drops = given_split(filtered, prep.min_session_length)
            train_tr, valid, valid_drops = last_sessions_split(
                train, prep.valid_fraction, prep.min_session_length
            )
        else:
            t_split = split_time(filtered[TIME].max(), prep)  # type: ignore[arg-type]
            train, test, split_drops = time_split(filtered, t_split, prep.min_session_length)
            # The same window once more, ending where test begins (the references' 2N days).
            t_split_valid = t_split - timedelta(days=prep.test_days)
            train_tr, valid, inner = time_split(
                train, t_split_valid, prep.min_session_length, "valid"
            )
            valid_drops = {k: v for k, v in inner.items() if k.startswith("valid_")}
        del filtered
        dropped.update(split_drops)
        dropped.update(valid_drops)
    if train.height == 0:
        raise RecsysError(f"{origin}: the train split is empty (split time {t_split})")
    if test.height == 0:
        raise RecsysError(
            f"{origin}: the test split is empty after dropping unknown items and short sessions "
            f"(split time {t_split}); lengthen data.preparation.test_days or check the log's time span"
        )

    items = build_item_index(train)
    splits = {
        name: _ordered_by_start(attach_index(frame, items))
        for name, frame in ((TRAIN, train), (TEST, test), (TRAIN_TR, train_tr), (VALID, valid))
    }
    stats: dict[str, Any] = {
        "source": origin,
        # how the ids were read: "int" (every id an integer, 5002.0 included) or "str"
        "id_types": id_types,
        "timestamps": not has_given_split,
        "split": {
            "method": prep.split,
            "t_split": str(t_split) if t_split else None,
            "t_split_valid": str(t_split_valid) if t_split_valid else None,
        },
        "counts": counts,
        "dropped": dropped,
        "splits": {name: _summary(frame) for name, frame in splits.items()},
        "items": items.height,
        "test_predictions": int(splits[TEST].height - splits[TEST][SESSION].n_unique()),
        "valid_predictions": int(splits[VALID].height - splits[VALID][SESSION].n_unique()),
    }
    shares = {name: repeat_target_shares(splits[name]) for name in (TEST, VALID)}
    stats["repeat_targets"] = {name: seen for name, (seen, _) in shares.items()}
    stats["last_item_targets"] = {name: last for name, (_, last) in shares.items()}
    if not stats["timestamps"]:
        for summary in stats["splits"].values():
            summary.pop("time_min", None)
            summary.pop("time_max", None)
    return PreparedDataset(items=items, stats=stats, **splits)


def write_prepared(
    dataset: PreparedDataset, directory: Path, extra_stats: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the splits, the item index and ``stats.json`` (the dataset's statistics, then
    ``extra_stats``, then the content fingerprint) as one directory that replaces ``directory``
    whole; returns the statistics written."""
    stats = dataset.stats | (extra_stats or {})
    with atomic_directory(directory) as tmp:
        for name in (TRAIN, TEST, TRAIN_TR, VALID):
            write_table(dataset.split(name), tmp / split_file(name))
        write_table(dataset.items, tmp / ITEMS_FILE)
        stats["fingerprint"] = data_fingerprint(tmp)
        write_json(tmp / STATS_FILE, stats)
    return stats


def write_table(frame: pl.DataFrame | pl.LazyFrame, path: Path) -> None:
    """One prepared file, laid out by us (fixed row groups, no statistics) rather than by the
    writer's heuristics, so the in-memory and the streaming path write the same bytes."""
    frame.lazy().sink_parquet(path, statistics=False, row_group_size=ROW_GROUP)


def data_fingerprint(directory: Path) -> str:
    """Content hash of a prepared dataset's Parquet files (the MLflow data tag)."""
    files = [*(split_file(name) for name in (TRAIN, TEST, TRAIN_TR, VALID)), ITEMS_FILE]
    return digest((directory / name).read_bytes() for name in files)


def load_prepared(directory: Path) -> PreparedDataset:
    """Read a prepared dataset; a missing or partial one is a clear error, not a traceback."""
    directory = Path(directory)
    needed = [split_file(s) for s in (TRAIN, TEST, TRAIN_TR, VALID)] + [ITEMS_FILE, STATS_FILE]
    missing = [n for n in needed if not (directory / n).exists()]
    if missing:
        raise RecsysError(
            f"{directory}: no prepared dataset here (missing {', '.join(missing)}); "
            f"run `recsys prepare --config ...` first"
        )
    frames = {s: pl.read_parquet(directory / split_file(s)) for s in (TRAIN, TEST, TRAIN_TR, VALID)}
    return PreparedDataset(
        items=pl.read_parquet(directory / ITEMS_FILE),
        stats=json.loads((directory / STATS_FILE).read_text()),
        **frames,
    )
