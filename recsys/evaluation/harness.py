"""Next-item evaluation (DESIGN §4): every position of every test session, full catalogue.

For a test session i1..in and t = 1..n-1 the model sees i1..it (GRU4Rec from a zero hidden
state), scores every catalogue item, and the target is i(t+1) only. The rank of the target is
conservative by default (ties count against the model). Metrics are averaged over prediction
events, not sessions. Scoring is batched over many sessions at once; ranks are counted over the
catalogue with tensor ops, never a Python loop over items.
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


@dataclass
class MetricAccumulator:
    """Sums of per-event metric values; ``result()`` averages over prediction events."""

    cutoffs: Sequence[int]
    n_items: int
    coverage_k: int = 20
    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    covered: torch.Tensor | None = None

    def add(self, ranks: torch.Tensor, top_items: torch.Tensor | None = None) -> None:
        self.n += len(ranks)
        for k in self.cutoffs:
            hit = ranks <= k
            for metric, values in (
                ("recall", hit.to(torch.float64)),
                ("mrr", torch.where(hit, 1.0 / ranks, 0.0)),
                ("ndcg", torch.where(hit, 1.0 / torch.log2(ranks + 1), 0.0)),
            ):
                key = metric_name(metric, k)
                self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
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


@dataclass
class EvaluationResult:
    model: str
    metrics: dict[str, float]
    predictions: int
    sessions: int
    skipped_sessions: int
    unknown_events: int
    seconds: float

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


def _batches(sessions: list[np.ndarray], max_rows: int) -> Iterator[list[np.ndarray]]:
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
        for batch in _batches(sessions, batch_size):
            ranks, top = model.rank_sessions(batch, ties, max_k, exclude_seen)
            acc.add(ranks, top)
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
    )
