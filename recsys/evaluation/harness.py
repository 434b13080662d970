"""Next-item evaluation (DESIGN §4): every position of every test session, full catalogue.

For a test session i1..in and t = 1..n-1 the model sees i1..it (GRU4Rec from a zero hidden
state), scores every catalogue item, and the target is i(t+1) only. The rank of the target is
conservative by default (ties count against the model). Metrics are averaged over prediction
events, not sessions. Scoring is batched over many sessions at once; ranks are counted over the
catalogue with tensor ops, never a Python loop over items.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from recsys.core.progress import Progress
from recsys.data.batching import session_arrays
from recsys.data.schema import ITEM_IDX, SESSION
from recsys.evaluation.scorer import Recommender, next_item_targets

TieMode = Literal["conservative", "standard", "median"]
METRICS = ("recall", "mrr", "ndcg")


def metric_name(metric: str, k: int) -> str:
    """The one spelling of a metric key: ``recall@20``, ``mrr@20``, ``ndcg@20``, ``coverage@20``."""
    return f"{metric}@{k}"


def rank_from_counts(
    ties: TieMode | str, above: torch.Tensor | None, at_least: torch.Tensor | None
) -> torch.Tensor:
    """The tie rule, defined once: conservative = #(score >= target's) (the target included),
    standard = #(score > target's) + 1, median = their mean. Only the counts a mode needs are
    required; ranks are 1-based floats (the median mode can be .5)."""
    if ties == "standard":
        assert above is not None
        return above.to(torch.float64) + 1
    assert at_least is not None
    if ties == "conservative":
        return at_least.to(torch.float64)
    assert above is not None
    return (at_least.to(torch.float64) + above.to(torch.float64) + 1) / 2


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, ties: TieMode | str) -> torch.Tensor:
    """1-based rank of each row's target among all items, by the tie rule of ``ties``."""
    target_scores = scores.gather(1, targets.view(-1, 1))  # (N, 1)
    above = (scores > target_scores).sum(1) if ties != "conservative" else None
    at_least = (scores >= target_scores).sum(1) if ties != "standard" else None
    return rank_from_counts(ties, above, at_least)


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


def _exclude_seen(scores: torch.Tensor, batch: list[np.ndarray]) -> torch.Tensor:
    """Mask items already clicked in each prefix (only when the config asks for it)."""
    row = 0
    for s in batch:
        for t in range(len(s) - 1):
            scores[row, torch.from_numpy(s[: t + 1])] = float("-inf")
            row += 1
    return scores


def evaluate(
    model: Recommender,
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
            if exclude_seen:
                scores = _exclude_seen(model.score_sessions(batch).clone(), batch)
                ranks = target_ranks(scores, next_item_targets(batch, scores.device), ties).cpu()
                top = torch.topk(scores, max_k, dim=1).indices
            else:
                ranks, top = model.rank_sessions(batch, ties, max_k)
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


def naive_evaluate(
    model: Recommender,
    events: pl.DataFrame,
    cutoffs: Sequence[int] = (1, 5, 10, 20),
    ties: TieMode = "conservative",
) -> dict[str, float]:
    """One prefix at a time, one rank at a time: the slow reference the batched path must match."""
    sessions, _, _ = test_sessions(events)
    ranks: list[float] = []
    for s in sessions:
        for t in range(len(s) - 1):
            scores = model.score_next([s[: t + 1]])[0]
            target = float(scores[int(s[t + 1])])
            greater = sum(1 for v in scores.tolist() if v > target)
            equal = sum(1 for v in scores.tolist() if v == target)
            if ties == "standard":
                ranks.append(greater + 1)
            elif ties == "conservative":
                ranks.append(greater + equal)
            else:
                ranks.append(greater + (equal + 1) / 2)
    out: dict[str, float] = {}
    n = len(ranks)
    for k in cutoffs:
        out[metric_name("recall", k)] = sum(r <= k for r in ranks) / n
        out[metric_name("mrr", k)] = sum(1 / r for r in ranks if r <= k) / n
        out[metric_name("ndcg", k)] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / n
    return out
