"""Sessions for logs that have none (or over-long ones): each user's stream cut at inactivity gaps.

The readers of such formats parse a user column (``USER``) instead of a session id, and may mark
the events to keep after cutting (``KEEP``): RetailRocket cuts on every event but keeps views.
"""

from __future__ import annotations

import polars as pl

from recsys.config import SourceConfig
from recsys.data.schema import SESSION, TIME
from recsys.data.sources.parsing import canonical

USER = "__user"  # the column that sessionised formats cut into sessions
KEEP = "__keep"  # sessionised formats: is this event kept after sessionising (e.g. a view)


def _cut_at_gaps(frame: pl.LazyFrame, user: str, gap_minutes: float) -> pl.LazyFrame:
    """Cut each user's event stream into sessions at inactivity gaps longer than ``gap_minutes``.

    Session ids are 1, 2, ... in (user, time) order, so they are unique across all input files.
    """
    gap = pl.duration(milliseconds=int(round(gap_minutes * 60_000)))
    return frame.sort([user, TIME], maintain_order=True).with_columns(
        ((pl.col(user) != pl.col(user).shift(1)) | ((pl.col(TIME) - pl.col(TIME).shift(1)) > gap))
        .fill_null(True)
        .cum_sum()
        .cast(pl.Int64)
        .alias(SESSION)
    )


def sessionise_streams(frames: list[pl.DataFrame], config: SourceConfig) -> pl.LazyFrame:
    """All files of a source together (a user's stream may span two monthly files), then cut."""
    events = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    sessions = _cut_at_gaps(events.lazy(), USER, config.session_gap_minutes)
    if KEEP in events.columns:
        sessions = sessions.filter(pl.col(KEEP))
    return canonical(sessions)
