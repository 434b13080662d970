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
from recsys.data.schema import ITEM, SESSION, SUPPORT, TEST, TIME, VALID
from recsys.data.splits import session_start

_START = "__start"


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
    ranges = _ranges(pl.concat(starts) if starts else pl.Series(_START, []), parts.n)
    ordered = [
        pl.scan_parquet(parts.root / f"{name}.ordered" / f"{k}.parquet") for k in range(parts.n)
    ]
    for r, (lo, hi) in enumerate(ranges):
        inside = pl.lit(True)
        if lo is not None:
            inside &= pl.col(_START) >= lo
        if hi is not None:
            inside &= pl.col(_START) < hi
        frame = pl.concat(ordered).filter(inside).collect(engine="streaming")
        frame = frame.sort([_START, SESSION, TIME], maintain_order=True)
        parts.write(f"{name}.ranges", r, frame.drop(_START))
    write_table(
        pl.concat(
            [
                pl.scan_parquet(parts.root / f"{name}.ranges" / f"{r}.parquet")
                for r in range(len(ranges))
            ]
        ),
        out,
    )
    parts.drop(f"{name}.ordered")
    parts.drop(f"{name}.ranges")
    summary = summary_of(
        n_events,
        pl.concat(lengths) if lengths else pl.Series([], dtype=pl.UInt32),
        pl.concat(uniques).n_unique() if uniques else 0,
        (min(span), max(span)) if span else (None, None),
    )
    return {"summary": summary, "predictions": n_events - n_sessions, "repeat": repeat}


def _ranges(starts: pl.Series, n: int) -> list[tuple[Any, Any]]:
    """``n`` start-time ranges of about equal session counts, covering every start."""
    if n == 1 or starts.len() == 0:
        return [(None, None)]
    ordered = starts.sort()
    cuts = sorted({ordered[i * ordered.len() // n] for i in range(1, n)})
    bounds: list[Any] = [None, *cuts, None]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
