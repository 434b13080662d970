"""The protocol's splits: test by time (or as the source gave it), valid the same way in train.

Sessions here are contiguous runs of rows in time order (preparation sorts them so first, and
every later step only filters rows or reorders whole sessions), so a session's length and start
come from its run (O(n), no hashing), which keeps 10M-event logs fast. The filters of
preparation use the same per-session expressions.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

from recsys.config import PreparationConfig
from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME


def session_length() -> pl.Expr:
    """Per row, the length of its session (sessions must be contiguous runs)."""
    return pl.col(SESSION).rle().struct.field("len").gather(pl.col(SESSION).rle_id())


def session_start() -> pl.Expr:
    """Per row, the time of its session's first event (contiguous runs in time order)."""
    run = pl.col(SESSION).rle_id()
    return pl.when(run.diff().fill_null(1) != 0).then(pl.col(TIME)).forward_fill()


def drop_short_sessions(events: pl.DataFrame, min_length: int) -> pl.DataFrame:
    """Drop sessions with fewer than ``min_length`` events (sessions contiguous, as sorted)."""
    return events.filter(session_length() >= min_length)


def session_order(events: pl.DataFrame) -> pl.DataFrame:
    """Sessions sorted by start time (ties by session id): the order GRU4Rec trains in."""
    return (
        events.group_by(SESSION)
        .agg(pl.col(TIME).min().alias("start"))
        .sort(["start", SESSION], maintain_order=True)
    )


def check_split_mode(prep: PreparationConfig, has_given_split: bool, origin: str) -> None:
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


def split_time(t_max: datetime, prep: PreparationConfig) -> datetime:
    """Where test begins: ``split_time`` when set, else ``test_days`` before ``t_max``, the
    last event (a scalar, so a log read in parts gives the same time)."""
    if prep.split_time:
        try:
            t = datetime.fromisoformat(prep.split_time)
        except ValueError:
            raise RecsysError(
                f"data.preparation.split_time: expected an ISO time such as 2016-05-25T00:00:00, "
                f"got {prep.split_time!r}"
            ) from None
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    return t_max - timedelta(days=prep.test_days)


def restrict_to_items(
    held_out: pl.DataFrame, items: pl.Series, min_length: int, name: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Held-out events of items not in ``items`` (train's) go, then held-out sessions grown too
    short. ``items`` is passed in, so a log read in session parts restricts each part alike."""
    known = held_out.filter(pl.col(ITEM).is_in(items.implode()))
    kept = drop_short_sessions(known, min_length)
    return kept, {
        f"{name}_unknown_items": held_out.height - known.height,
        f"{name}_short_sessions": known.height - kept.height,
    }


def _restrict(
    train: pl.DataFrame, held_out: pl.DataFrame, min_length: int, name: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    return restrict_to_items(held_out, train[ITEM].unique(), min_length, name)


def time_cut(
    events: pl.DataFrame, t_split: datetime, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The per-session half of ``time_split``: train (events before ``t_split``, short sessions
    dropped) and the held-out sessions before their restriction to train's items."""
    test_all = events.filter(session_start() >= t_split)
    train_all = events.filter(pl.col(TIME) < t_split)
    train = drop_short_sessions(train_all, min_length)
    return (
        train,
        test_all,
        {
            "train_events_at_or_after_split": events.height - train_all.height - test_all.height,
            "train_short_sessions_after_split": train_all.height - train.height,
        },
    )


def time_split(
    events: pl.DataFrame, t_split: datetime, min_length: int, name: str = "test"
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Test = sessions starting at/after ``t_split``; train = events strictly before it.

    A session that straddles ``t_split`` keeps its early part in train and is not in test, so
    no event at or after ``t_split`` ever reaches training. Test events of items unseen in
    train are dropped, then test sessions shorter than ``min_length``. Returns the row counts
    dropped at each point, named with ``name`` for the held-out part.
    """
    train, test_all, cut = time_cut(events, t_split, min_length)
    test, dropped = _restrict(train, test_all, min_length, name)
    return train, test, cut | dropped


def given_cut(
    events: pl.DataFrame, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The per-session half of ``given_split``: train (short sessions dropped) and test as the
    reader's ``split`` column gives them, before test's restriction to train's items."""
    train_all = events.filter(pl.col(SPLIT) == "train").drop(SPLIT)
    train = drop_short_sessions(train_all, min_length)
    test_all = events.filter(pl.col(SPLIT) == "test").drop(SPLIT)
    return train, test_all, {"train_short_sessions_after_split": train_all.height - train.height}


def given_split(
    events: pl.DataFrame, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """The reader's ``split`` column decides; test is restricted to train items as usual."""
    train, test_all, cut = given_cut(events, min_length)
    test, dropped = _restrict(train, test_all, min_length, "test")
    return train, test, cut | dropped


def last_session_ids(order: pl.DataFrame, fraction: float) -> pl.Series:
    """The last ``fraction`` of sessions of ``session_order`` (at least one): valid's sessions."""
    n_valid = max(1, int(round(order.height * fraction)))
    return order[SESSION].tail(n_valid)


def last_sessions_split(
    train: pl.DataFrame, fraction: float, min_length: int
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """For logs without timestamps: the last ``fraction`` of sessions (in order) are held out."""
    valid_ids = last_session_ids(session_order(train), fraction).implode()
    tr = train.filter(~pl.col(SESSION).is_in(valid_ids))
    valid, dropped = _restrict(
        tr, train.filter(pl.col(SESSION).is_in(valid_ids)), min_length, "valid"
    )
    return tr, valid, dropped
