"""The replay's days: the log cut into days, each day's models trained, and scored on its sessions.

A day is 24 hours counted back from the log's last event (as ``test_days`` is), so every
replayed day is a whole one. A day's test sessions are those that start in it; a warm model
trains on the window before the day (``train.window_days``, default one day) from the previous
model, a cold one on everything before it. Targets the model has never seen stay in the count
as misses: the metrics are over every next-item prediction of the day.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import torch

from pipelines.evaluate import harness_options
from pipelines.warm import lineage
from recsys.config import Config
from recsys.core.errors import RecsysError
from recsys.data.preparation import PreparedDataset
from recsys.data.schema import ITEM, ITEM_IDX, SESSION, TIME
from recsys.data.splits import drop_short_sessions, session_start
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.training.trainer import train_gru4rec
from recsys.training.warm_start import warm_start

DAY = timedelta(days=1)
YOUNG_DAYS = (1, 7)  # item ages (days since its first click in the log) reported per day


@dataclass(frozen=True)
class DayModel:
    """A model of the replay and what it cost: seconds of the whole update (index, state
    mapping and training), clicks trained on, items new to it."""

    model: TrainedModel
    seconds: float
    clicks: int
    new_items: int


def replay_log(data: PreparedDataset) -> pl.DataFrame:
    """The prepared log as one table of raw ids in session-start order (train, then test)."""
    if not data.stats.get("timestamps", True):
        raise RecsysError(
            f"{data.stats.get('source')}: this log has no timestamps (its split is given); "
            f"a day-by-day replay needs them"
        )
    columns = [SESSION, ITEM, TIME]
    return pl.concat([data.train.select(columns), data.test.select(columns)])


def day_starts(log: pl.DataFrame, days: int) -> list[datetime]:
    """The starts of the last ``days`` whole days, oldest first; room is left for a first
    model trained before them."""
    first: datetime = log[TIME].min()  # type: ignore[assignment]
    end: datetime = log[TIME].max() + timedelta(milliseconds=1)  # type: ignore[operator]
    starts = [end - (days - i) * DAY for i in range(days)]
    if starts[0] - 2 * DAY < first:
        span = (end - first) / DAY
        raise RecsysError(
            f"replay --days {days}: the log spans {span:.1f} days; at most {int(span) - 2} "
            f"can be replayed (two days before them train the first model)"
        )
    return starts


def sessions_starting(log: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    """Every event of the sessions that start in [start, end)."""
    first = session_start()
    return log.filter((first >= start) & (first < end))


def clicks_between(log: pl.DataFrame, start: datetime | None, end: datetime) -> pl.DataFrame:
    """Clicks in [start, end) (all before ``end`` without a start), sessions of two or more."""
    keep = pl.col(TIME) < end
    if start is not None:
        keep = keep & (pl.col(TIME) >= start)
    return drop_short_sessions(log.filter(keep), 2)


def _with_index(events: pl.DataFrame, ids: list[Any]) -> pl.DataFrame:
    """``events`` with ``item_idx`` in the index ``ids`` (null for an id it lacks)."""
    index = pl.DataFrame(
        {ITEM: pl.Series(ids, dtype=events.schema[ITEM]), ITEM_IDX: np.arange(len(ids))}
    )
    return events.join(index, on=ITEM, how="left", maintain_order="left")


def _support(events: pl.DataFrame, n: int) -> torch.Tensor:
    counts = np.bincount(events[ITEM_IDX].to_numpy(), minlength=n)
    return torch.from_numpy(counts.astype(np.float64))


def train_cold(config: Config, clicks: pl.DataFrame) -> DayModel:
    """A model from scratch on ``clicks``: the index is their items by raw id, as prepare's."""
    start = time.perf_counter()
    ids = clicks[ITEM].unique().sort().to_list()
    events = _with_index(clicks, ids)
    result = train_gru4rec(events, len(ids), config.model, config.train)
    support = _support(events, len(ids)).tolist()
    trained = TrainedModel(
        result.model,
        ItemIndex.of(ids, support),
        config.name,
        "",
        result.optimizer,
        lineage(clicks, ""),
    )
    return DayModel(trained, time.perf_counter() - start, clicks.height, len(ids))


def train_warm_day(config: Config, base: TrainedModel, clicks: pl.DataFrame, name: str) -> DayModel:
    """``base`` continued on ``clicks``: its items keep their rows and places, new ones are
    appended (by raw id), and its optimiser state carries over."""
    start = time.perf_counter()
    known = set(base.items.ids)
    new = [i for i in clicks[ITEM].unique().sort().to_list() if i not in known]
    ids = [*base.items.ids, *new]
    events = _with_index(clicks, ids)
    warm = warm_start(
        base.network,
        base.items.ids,
        base.items.support,
        base.optimizer,
        ids,
        _support(events, len(ids)),
        config.model,
        config.train.momentum,
        config.train.seed,
        name,
    )
    result = train_gru4rec(events, len(ids), config.model, config.train, warm=warm)
    trained = TrainedModel(
        result.model,
        ItemIndex.of(ids, warm.support.tolist()),
        config.name,
        "",
        result.optimizer,
        lineage(clicks, name),
    )
    return DayModel(trained, time.perf_counter() - start, clicks.height, len(new))


def targets(test: pl.DataFrame) -> pl.DataFrame:
    """The events that are predicted: every click but the first of its session."""
    return test.filter(~pl.col(SESSION).is_first_distinct())


def score_day(model: TrainedModel, test: pl.DataFrame, config: Config) -> dict[str, float]:
    """The model's metrics over every next-item prediction of the day's sessions. The harness
    skips clicks on items the model lacks (as serving does); a prediction it could not make
    (an unknown target, or no known click before it) counts as a miss, so the denominator is
    the same for every model of the day."""
    events = _with_index(test, list(model.items.ids))
    result = evaluate(
        GRU4RecScorer(model.network),
        events,
        show_progress=False,
        **harness_options(config),
    )
    total = targets(test).height
    scale = result.predictions / total if total else 0.0
    metrics = {k: v * scale for k, v in result.metrics.items() if k.split("@")[0] != "coverage"}
    unknown = targets(events)[ITEM_IDX].null_count()
    metrics["unknown_targets"] = unknown / total if total else 0.0
    return metrics


def young_shares(log: pl.DataFrame, test: pl.DataFrame) -> dict[str, float]:
    """Shares of the day's predicted clicks on items first clicked less than 1 / 7 days before."""
    first = log.group_by(ITEM).agg(pl.col(TIME).min().alias("__first"))
    aged = targets(test).join(first, on=ITEM, how="left")
    age = (aged[TIME] - aged["__first"]).dt.total_milliseconds() / DAY.total_seconds() / 1000
    n = max(aged.height, 1)
    return {f"young_{d}d": float((age < d).sum()) / n for d in YOUNG_DAYS}
