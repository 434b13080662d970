"""Parts of a log that each hold whole sessions, kept as Parquet files in a work folder, and
the one step that needs them all at once: ordering a split by session start across parts.

``recsys.data.streaming`` runs the protocol over them. A split is ordered by cutting every
part's rows into session-start ranges of about equal size, sorting each range alone (rows of
one session come from one part, in that part's order, so the stable sort's ties fall as in the
in-memory path), and streaming the ranges into one file in order.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.preparation import (
    attach_index,
    repeat_target_counts,
    summary_of,
    write_table,
)
from recsys.data.schema import ITEM, ITEM_IDX, SESSION, SUPPORT, TEST, TIME, VALID
from recsys.data.splits import session_start

_START = "__start"
_RANGE = "__range"


class Parts:
    """Named sets of Parquet parts in a work folder: ``name/k.parquet`` for part ``k``."""

    def __init__(self, root: Path, n: int, schema: pl.Schema) -> None:
        self.root, self.n, self.schema = root, n, schema

    def read(self, name: str, k: int) -> pl.DataFrame:
        path = self.root / name / f"{k}.parquet"
        return pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=self.schema)

    def write(self, name: str, k: int, frame: pl.DataFrame) -> None:
        (self.root / name).mkdir(exist_ok=True)
        frame.write_parquet(self.root / name / f"{k}.parquet", compression="lz4")

    def drop(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def map(self, src: str, dst: str, fn: Callable[[pl.DataFrame], pl.DataFrame]) -> list[Any]:
        """``fn`` on every part of ``src`` into ``dst``; returns each part's ``facts_of``."""
        facts = []
        for k in range(self.n):
            out = fn(self.read(src, k))
            self.write(dst, k, out)
            facts.append(facts_of(out))
            del out
        self.drop(src)
        return facts


def facts_of(frame: pl.DataFrame) -> dict[str, Any]:
    """What the global steps need of a part: its size, item counts and last time."""
    return {
        "height": frame.height,
        "counts": frame.group_by(ITEM).len(name=SUPPORT),
        "t_max": frame[TIME].max() if frame.height else None,
    }


def item_counts(facts: list[dict[str, Any]]) -> pl.DataFrame:
    frames = [f["counts"] for f in facts]
    return pl.concat(frames).group_by(ITEM).agg(pl.col(SUPPORT).sum())


def total_height(facts: list[dict[str, Any]]) -> int:
    return sum(f["height"] for f in facts)


def write_ordered(parts: Parts, items: pl.DataFrame, name: str, out: Path) -> dict[str, Any]:
    """Index and order one split across parts (by session start) into ``out``; returns its
    statistics' parts."""
    lengths, uniques, starts = [], [], []
    n_events = n_sessions = 0
    span: list[Any] = []
    repeat = [0, 0, 0]
    for k in range(parts.n):
        # sessions are contiguous here, in time order: their start is one pass; the ranges
        # below do ``_ordered_by_start``'s sort
        frame = attach_index(parts.read(name, k), items).with_columns(session_start().alias(_START))
        parts.write(f"{name}.ordered", k, frame)
        if frame.height:
            run = frame[SESSION].rle().struct.field("len")
            lengths.append(run)
            uniques.append(frame[ITEM].unique())
            starts.append(frame.filter(pl.col(SESSION).rle_id().diff().fill_null(1) != 0)[_START])
            span += [frame[TIME].min(), frame[TIME].max()]
            n_events += frame.height
            n_sessions += run.len()
            if name in (TEST, VALID):  # the splits stats.json reports repeat targets of
                counts = repeat_target_counts(frame)
                repeat = [a + b for a, b in zip(repeat, counts, strict=True)]
    parts.drop(name)
    cuts = _cuts(pl.concat(starts) if starts else pl.Series(_START, []), parts.n)
    for k in range(parts.n):  # each part's rows into its start ranges: one read per part
        frame = parts.read(f"{name}.ordered", k)
        where = cuts.search_sorted(frame[_START], side="right").alias(_RANGE)
        for (r,), rows in (
            frame.with_columns(where)
            .partition_by(_RANGE, as_dict=True, maintain_order=True)
            .items()
        ):
            parts.write(f"{name}.range{r}", k, rows.drop(_RANGE))
    parts.drop(f"{name}.ordered")
    for r in range(cuts.len() + 1):  # each range alone: its rows from every part, in part order
        files = [parts.root / f"{name}.range{r}" / f"{k}.parquet" for k in range(parts.n)]
        found = [pl.read_parquet(f) for f in files if f.exists()]
        if found:
            frame = pl.concat(found).sort([_START, SESSION, TIME], maintain_order=True)
            parts.write(f"{name}.sorted", r, frame.drop(_START))
        parts.drop(f"{name}.range{r}")
    sorted_files = sorted(
        (parts.root / f"{name}.sorted").glob("*.parquet"), key=lambda f: int(f.stem)
    )
    if sorted_files:
        write_table(pl.concat([pl.scan_parquet(f) for f in sorted_files]), out)
    else:  # an empty split: the in-memory path writes the empty frame with its columns
        empty = attach_index(parts.read(name, 0), items).head(0)
        write_table(empty.select(SESSION, ITEM, TIME, ITEM_IDX), out)
    parts.drop(f"{name}.sorted")
    summary = summary_of(
        n_events,
        pl.concat(lengths) if lengths else pl.Series([], dtype=pl.UInt32),
        pl.concat(uniques).n_unique() if uniques else 0,
        (min(span), max(span)) if span else (None, None),
    )
    return {"summary": summary, "predictions": n_events - n_sessions, "repeat": repeat}


def _cuts(starts: pl.Series, n: int) -> pl.Series:
    """Start times cutting the sessions into ``n`` ranges of about equal counts (sorted, unique;
    range ``r`` holds the starts in ``[cuts[r - 1], cuts[r])``)."""
    if n == 1 or starts.len() == 0:
        return starts.head(0)
    ordered = starts.sort()
    picked = [ordered[i * ordered.len() // n] for i in range(1, n)]
    return pl.Series(_START, picked, dtype=starts.dtype).unique(maintain_order=True)
