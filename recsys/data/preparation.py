"""Preparation: raw events -> filtered, time-split dataset with an item index (DESIGN §2).

Every step is a polars expression over the whole table; the only loop is the fixed-point
iteration of the session-length and item-support filters. Outputs are written atomically as a
directory of Parquet files plus ``stats.json``, which records counts at every step and why rows
were dropped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from recsys.core.atomic import atomic_directory, write_json
from recsys.config import Config, PreparationConfig
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
from recsys.data.sources import read_events
from recsys.core.errors import RecsysError
from recsys.core.progress import step

PREPARATION_VERSION = 2  # bump when the protocol changes, so cached outputs are redone


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
# later step only filters rows or reorders whole sessions, so that stays true. The helpers below
# rely on it: a session's length and start come from its run (O(n), no hashing), which keeps
# 10M-event logs fast.


def _session_length() -> pl.Expr:
    """Per row, the length of its session (sessions must be contiguous runs)."""
    return pl.col(SESSION).rle().struct.field("len").gather(pl.col(SESSION).rle_id())


def _session_start() -> pl.Expr:
    """Per row, the time of its session's first event (contiguous runs in time order)."""
    run = pl.col(SESSION).rle_id()
    return pl.when(run.diff().fill_null(1) != 0).then(pl.col(TIME)).forward_fill()


def _summary(events: pl.DataFrame) -> dict[str, Any]:
    if events.height == 0:
        return {"events": 0, "sessions": 0, "items": 0}
    lengths = events[SESSION].rle().struct.field("len")
    return {
        "events": events.height,
        "sessions": lengths.len(),
        "items": events[ITEM].n_unique(),
        "time_min": str(events[TIME].min()),
        "time_max": str(events[TIME].max()),
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


def sort_events(events: pl.LazyFrame) -> pl.LazyFrame:
    """Stable sort by (session, time): ties keep file order, as the click log recorded them."""
    return events.sort([SESSION, TIME], maintain_order=True)


def drop_consecutive_repeats(events: pl.LazyFrame) -> pl.LazyFrame:
    """Collapse runs of the same item within a session (a reload is not a new intent)."""
    repeat = (pl.col(ITEM) == pl.col(ITEM).shift(1)) & (pl.col(SESSION) == pl.col(SESSION).shift(1))
    return events.filter(~repeat.fill_null(False))


def drop_short_sessions(events: pl.DataFrame, min_length: int) -> pl.DataFrame:
    """Drop sessions with fewer than ``min_length`` events (sessions contiguous, as sorted)."""
    return events.filter(_session_length() >= min_length)


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


def _restrict(
    train: pl.DataFrame, held_out: pl.DataFrame, min_length: int, name: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Held-out events of items unseen in ``train`` go, then held-out sessions grown too short."""
    known = held_out.filter(pl.col(ITEM).is_in(train[ITEM].unique().implode()))
    kept = drop_short_sessions(known, min_length)
    return kept, {
        f"{name}_unknown_items": held_out.height - known.height,
        f"{name}_short_sessions": known.height - kept.height,
    }


def time_split(
    events: pl.DataFrame, t_split: datetime, min_length: int, name: str = "test"
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Test = sessions starting at/after ``t_split``; train = events strictly before it.

    A session that straddles ``t_split`` keeps its early part in train and is not in test, so
    no event at or after ``t_split`` ever reaches training. Test events of items unseen in
    train are dropped, then test sessions shorter than ``min_length``. Returns the row counts
    dropped at each point, named with ``name`` for the held-out part.
    """
    test_all = events.filter(_session_start() >= t_split)
    train_all = events.filter(pl.col(TIME) < t_split)
    train = drop_short_sessions(train_all, min_length)
    test, dropped = _restrict(train, test_all, min_length, name)
    return (
        train,
        test,
        {
            "train_events_at_or_after_split": events.height - train_all.height - test_all.height,
            "train_short_sessions_after_split": train_all.height - train.height,
        }
        | dropped,
    )


def given_split(
    events: pl.DataFrame, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The reader's ``split`` column decides; test is restricted to train items as usual."""
    train_all = events.filter(pl.col(SPLIT) == "train").drop(SPLIT)
    train = drop_short_sessions(train_all, min_length)
    test, dropped = _restrict(
        train, events.filter(pl.col(SPLIT) == "test").drop(SPLIT), min_length, "test"
    )
    return (
        train,
        test,
        {"train_short_sessions_after_split": train_all.height - train.height} | dropped,
    )


def last_sessions_split(
    train: pl.DataFrame, fraction: float, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """For logs without timestamps: the last ``fraction`` of sessions (in order) are held out."""
    order = session_order(train)
    n_valid = max(1, int(round(order.height * fraction)))
    valid_ids = order[SESSION].tail(n_valid).implode()
    tr = train.filter(~pl.col(SESSION).is_in(valid_ids))
    valid, dropped = _restrict(
        tr, train.filter(pl.col(SESSION).is_in(valid_ids)), min_length, "valid"
    )
    return tr, valid, dropped


def session_order(events: pl.DataFrame) -> pl.DataFrame:
    """Sessions sorted by start time (ties by session id): the order GRU4Rec trains in."""
    return (
        events.group_by(SESSION)
        .agg(pl.col(TIME).min().alias("start"))
        .sort(["start", SESSION], maintain_order=True)
    )


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
        events.with_columns(_session_start().alias("__start"))
        .sort(["__start", SESSION, TIME], maintain_order=True)
        .drop("__start")
    )


def build_item_index(train: pl.DataFrame) -> pl.DataFrame:
    """Contiguous ``item_idx`` over train items, ordered by raw id (stable across reruns)."""
    return (
        train.group_by(ITEM)
        .len(name=SUPPORT)
        .sort(ITEM)
        .with_row_index(ITEM_IDX)
        .with_columns(pl.col(ITEM_IDX).cast(pl.Int64), pl.col(SUPPORT).cast(pl.Int64))
        .select(ITEM_IDX, ITEM, SUPPORT)
    )


def attach_index(events: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    return events.join(items.select(ITEM, ITEM_IDX), on=ITEM, how="inner", maintain_order="left")


# --- the whole step ---------------------------------------------------------------------------


def source_fingerprint(config: Config) -> str:
    """Cheap identity of the raw input: sizes and mtimes of the files (or the generator knobs)."""
    src = config.data.source
    parts: list[str] = [src.model_dump_json()]
    for p in src.paths:
        st = Path(p).stat() if Path(p).exists() else None
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}" if st else f"{p}:missing")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_key(config: Config) -> str:
    blob = json.dumps(
        {
            "version": PREPARATION_VERSION,
            "data": config.section_hash("data"),
            "source": source_fingerprint(config),
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_up_to_date(config: Config) -> bool:
    stats_path = config.prepared_dir / STATS_FILE
    if not stats_path.exists():
        return False
    try:
        stats = json.loads(stats_path.read_text())
    except json.JSONDecodeError:
        return False
    files = [config.prepared_dir / split_file(s) for s in (TRAIN, TEST, TRAIN_TR, VALID)]
    files.append(config.prepared_dir / ITEMS_FILE)
    return stats.get("cache_key") == cache_key(config) and all(f.exists() for f in files)


def prepare_events(events: pl.LazyFrame, prep: PreparationConfig, origin: str) -> PreparedDataset:
    """Run the protocol on canonical events (in memory); no file is written here."""
    dropped: dict[str, Any] = {}
    counts: dict[str, int] = {}
    with step("  reading and sorting"):
        try:
            has_given_split = SPLIT in events.collect_schema().names()
            _check_split_mode(prep, has_given_split, origin)
            raw = events.collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RecsysError(f"{origin}: could not read the events: {first}") from None
        counts["raw_events"] = raw.height
        if raw.height == 0:
            raise RecsysError(f"{origin}: no events to prepare (the input has no rows)")
        complete = raw.drop_nulls([SESSION, ITEM, TIME])
        dropped["missing_values"] = raw.height - complete.height
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
            t_split = _split_time(filtered, prep)
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
    if not stats["timestamps"]:
        for summary in stats["splits"].values():
            summary.pop("time_min", None)
            summary.pop("time_max", None)
    return PreparedDataset(items=items, stats=stats, **splits)


def _check_split_mode(prep: PreparationConfig, has_given_split: bool, origin: str) -> None:
    """A given split needs a split column; a time split needs real timestamps."""
    if prep.split == "given" and not has_given_split:
        raise RecsysError(
            f"{origin}: data.preparation.split is 'given' but the source has no split column "
            f"(only srgnn_tsv has one); use split: time"
        )
    if prep.split == "time" and has_given_split:
        raise RecsysError(
            f"{origin}: data.preparation.split is 'time' but this source has no real timestamps "
            f"(its train/test split is given); use split: given"
        )


def _split_time(events: pl.DataFrame, prep: PreparationConfig) -> datetime:
    if prep.split_time:
        try:
            t = datetime.fromisoformat(prep.split_time)
        except ValueError:
            raise RecsysError(
                f"data.preparation.split_time: expected an ISO time such as 2016-05-25T00:00:00, "
                f"got {prep.split_time!r}"
            ) from None
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    t_max: datetime = events[TIME].max()  # type: ignore[assignment]
    return t_max - timedelta(days=prep.test_days)


def prepare(config: Config, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Prepare the configured source into ``config.prepared_dir``; returns (stats, was_redone).

    Skipped when the output exists for the same data config and raw input, unless ``force``.
    """
    out = config.prepared_dir
    if not force and is_up_to_date(config):
        return json.loads((out / STATS_FILE).read_text()), False
    start = time.perf_counter()
    origin = ", ".join(str(p) for p in config.data.source.paths) or config.data.source.format
    dataset = prepare_events(read_events(config.data.source), config.data.preparation, origin)
    stats = dict(dataset.stats)
    stats["cache_key"] = cache_key(config)
    with atomic_directory(out) as tmp:
        for name in (TRAIN, TEST, TRAIN_TR, VALID):
            dataset.split(name).write_parquet(tmp / split_file(name), statistics=False)
        dataset.items.write_parquet(tmp / ITEMS_FILE, statistics=False)
        stats["fingerprint"] = data_fingerprint(tmp)
        write_json(tmp / STATS_FILE, stats)
    # Timing is returned to the caller but not written: stats.json must be reproducible.
    return stats | {"seconds": round(time.perf_counter() - start, 3)}, True


def data_fingerprint(directory: Path) -> str:
    """Content hash of a prepared dataset's Parquet files (the MLflow data tag)."""
    h = hashlib.sha256()
    for name in (TRAIN, TEST, TRAIN_TR, VALID):
        h.update((directory / split_file(name)).read_bytes())
    h.update((directory / ITEMS_FILE).read_bytes())
    return h.hexdigest()[:16]


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
