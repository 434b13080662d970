"""Next-item evaluation (DESIGN §4): every position of every test session, full catalogue.

For a test session i1..in and t = 1..n-1 the model sees i1..it (GRU4Rec from a zero hidden
state), scores every catalogue item, and the target is i(t+1) only. The rank of the target is
conservative by default (ties count against the model). Metrics are averaged over prediction
events, not sessions. Scoring is batched over many sessions at once; ranks are counted over the
catalogue with tensor ops, never a Python loop over items.

The same sums are also kept per position in the session (the prefix length t, with every
t >= ``POSITION_BUCKETS`` in one last bucket): what a model's memory of the session buys shows
as the gap between the positions, and the prediction-weighted mean of the buckets is the
overall metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.core.metrics import METRICS, metric_name
from recsys.core.progress import Progress
from recsys.data.batching import session_arrays
from recsys.data.schema import ITEM_IDX, SESSION
from recsys.evaluation.scorer import SessionScorer
from recsys.ranking import TieMode

POSITION_BUCKETS = 10  # prefix lengths 1 .. 9, then one bucket for ">= 10" clicks
# Scores held at once (rows x catalogue): a batch of 512 rows over 1M items would be 2 GiB of
# fp32 scores and as much again in bounds, so large catalogues get fewer rows per batch.
SCORE_CELLS = 2**26


def position_label(bucket: int) -> str:
    """The bucket's name in tables and plots: ``"3"``, or ``">=10"`` for the last one."""
    return f">={POSITION_BUCKETS}" if bucket >= POSITION_BUCKETS else str(bucket)


def prefix_lengths(sessions: Sequence[np.ndarray]) -> torch.Tensor:
    """Clicks seen before each prediction (1 .. len - 1 per session), session-major like the
    ranks ``rank_sessions`` returns, so row i of both is the same prediction."""
    if not sessions:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate([np.arange(1, len(s)) for s in sessions]))


@dataclass
class MetricAccumulator:
    """Sums of per-event metric values; ``result()`` averages over prediction events, and
    ``by_position()`` over the events of each prefix-length bucket (when ``add`` got lengths)."""

    cutoffs: Sequence[int]
    n_items: int
    coverage_k: int = 20
    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    covered: torch.Tensor | None = None
    bucket_n: torch.Tensor = field(
        default_factory=lambda: torch.zeros(POSITION_BUCKETS + 1, dtype=torch.int64)
    )
    bucket_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(
        self,
        ranks: torch.Tensor,
        top_items: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """One batch: each prediction's target rank, its top items (for coverage) and, for the
        per-position sums, the prefix length it was made after (``prefix_lengths``)."""
        self.n += len(ranks)
        bucket = None
        if lengths is not None:
            bucket = lengths.clamp(max=POSITION_BUCKETS)
            self.bucket_n += torch.bincount(bucket, minlength=POSITION_BUCKETS + 1)
        for k in self.cutoffs:
            hit = ranks <= k
            for metric, values in (
                ("recall", hit.to(torch.float64)),
                ("mrr", torch.where(hit, 1.0 / ranks, 0.0)),
                ("ndcg", torch.where(hit, 1.0 / torch.log2(ranks + 1), 0.0)),
            ):
                key = metric_name(metric, k)
                self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
                if bucket is not None:
                    per = torch.bincount(
                        bucket, weights=values.to(torch.float64), minlength=POSITION_BUCKETS + 1
                    )
                    prev = self.bucket_sums.get(key)
                    self.bucket_sums[key] = per if prev is None else prev + per
        if top_items is not None:
            if self.covered is None:
                self.covered = torch.zeros(self.n_items, dtype=torch.bool)
            self.covered[top_items[:, : self.coverage_k].reshape(-1).cpu()] = True

    def result(self) -> dict[str, float]:
        out = {key: (value / self.n if self.n else 0.0) for key, value in self.sums.items()}
        for k in self.cutoffs:
            for metric in METRICS:
                out.setdefault(metric_name(metric, k), 0.0)
        if self.covered is not None:
            out[metric_name("coverage", self.coverage_k)] = float(self.covered.float().mean())
        return dict(sorted(out.items()))

    def by_position(self) -> list[dict[str, Any]]:
        """One row per non-empty bucket, first clicks first: ``position``, ``predictions`` and
        each metric at each cut-off averaged over that bucket's predictions."""
        keys = [metric_name(m, k) for m in METRICS for k in self.cutoffs]
        rows: list[dict[str, Any]] = []
        for b in range(1, POSITION_BUCKETS + 1):
            n = int(self.bucket_n[b])
            if n == 0:
                continue
            row: dict[str, Any] = {"position": position_label(b), "predictions": n}
            for key in keys:
                sums = self.bucket_sums.get(key)
                row[key] = float(sums[b]) / n if sums is not None else 0.0
            rows.append(row)
        return rows


@dataclass
class EvaluationResult:
    model: str
    metrics: dict[str, float]
    predictions: int
    sessions: int
    skipped_sessions: int
    unknown_events: int
    seconds: float
    by_position: list[dict[str, Any]] = field(default_factory=list)  # MetricAccumulator.by_position

    @property
    def events_per_second(self) -> float:
        return self.predictions / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.metrics,
            "predictions": self.predictions,
            "sessions": self.sessions,
            "skipped_sessions": self.skipped_sessions,
            "unknown_events": self.unknown_events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
        }


def test_sessions(events: pl.DataFrame) -> tuple[list[np.ndarray], int, int]:
    """Sessions as item arrays; unknown items (null ``item_idx``) are dropped and the session
    stitched around them, as the reference evaluator does. Returns (sessions, unknown events,
    sessions left with fewer than two known items)."""
    known = events.filter(pl.col(ITEM_IDX).is_not_null())
    unknown = events.height - known.height
    all_sessions = events[SESSION].n_unique()
    sessions = [s for s in session_arrays(known).sessions() if len(s) >= 2]
    return sessions, unknown, all_sessions - len(sessions)


def prediction_batches(sessions: list[np.ndarray], max_rows: int) -> Iterator[list[np.ndarray]]:
    """Consecutive groups of sessions with at most ``max_rows`` predictions (at least one session)."""
    batch: list[np.ndarray] = []
    rows = 0
    for s in sessions:
        if batch and rows + len(s) - 1 > max_rows:
            yield batch
            batch, rows = [], 0
        batch.append(s)
        rows += len(s) - 1
    if batch:
        yield batch


def batch_rows(batch_size: int, n_items: int) -> int:
    """Predictions scored at once: ``batch_size``, fewer for large catalogues (SCORE_CELLS)."""
    return max(1, min(batch_size, SCORE_CELLS // max(1, n_items)))


def evaluate(
    model: SessionScorer,
    events: pl.DataFrame,
    cutoffs: Sequence[int] = (1, 5, 10, 20),
    ties: TieMode = "conservative",
    batch_size: int = 512,
    exclude_seen: bool = False,
    coverage_k: int = 20,
    name: str | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Evaluate one fitted model on test events (columns session_id, item_idx; ordered)."""
    start = time.perf_counter()
    sessions, unknown, skipped = test_sessions(events)
    acc = MetricAccumulator(cutoffs, model.n_items, coverage_k)
    total = sum(len(s) - 1 for s in sessions)
    label = f"evaluate {name or model.name}"
    bar = Progress(total, label, unit="ev") if show_progress else None
    max_k = min(max(coverage_k, *cutoffs), model.n_items)
    with torch.inference_mode():
        for batch in prediction_batches(sessions, batch_rows(batch_size, model.n_items)):
            ranks, top = model.rank_sessions(batch, ties, max_k, exclude_seen)
            acc.add(ranks, top, prefix_lengths(batch))
            if bar is not None:
                bar.update(len(ranks))
    if bar is not None:
        bar.close()
    return EvaluationResult(
        model=name or model.name,
        metrics=acc.result(),
        predictions=acc.n,
        sessions=len(sessions),
        skipped_sessions=skipped,
        unknown_events=unknown,
        seconds=time.perf_counter() - start,
        by_position=acc.by_position(),
    )
