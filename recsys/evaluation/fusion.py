"""Two simple fusions of GRU4Rec with the session itself, for the results table.

- ``SessionBonusScorer``: GRU4Rec's scores plus ``w · log(1 + count of the item in the
  prefix)``. Adding a per-row constant (GRU4Rec's log-softmax normaliser) changes no rank, so
  this is exactly "log-softmax + bonus"; it is the constant that the learned repeat readout
  (``model.readout: repeat``) must beat, and it ranks through the same certified ranker.
- ``HybridScorer``: a late fusion with a session-kNN baseline, ``(1 - a) · softmax(GRU4Rec / T)
  + a · kNN / Σ kNN`` (both rows normalised to distributions; the temperature T turns scores
  that are no log-probabilities, as those of a BPR-max network, into a usable distribution).

The weights (and T) are chosen on ``valid`` by ``choose_weight`` (the hybrid's grid by
``choose_hybrid``, in one pass), never on ``test``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby
from typing import TypeVar

import numpy as np
import polars as pl
import torch

from recsys.core.metrics import Metric
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import (
    MetricAccumulator,
    batch_rows,
    evaluate,
    prediction_batches,
    test_sessions,
)
from recsys.evaluation.scorer import SessionScorer
from recsys.model.gru4rec import GRU4Rec
from recsys.ranking import Boost, next_item_targets, rank_scores

W = TypeVar("W", float, tuple[float, float])  # a fusion's weight, or (temperature, weight)


def count_boost(prefixes: Sequence[np.ndarray], weight: float) -> Boost:
    """``weight · log(1 + count)`` for each prefix's distinct items: (M, L) items and values."""
    counted = [np.unique(np.asarray(p, dtype=np.int64), return_counts=True) for p in prefixes]
    width = max((len(items) for items, _ in counted), default=1)
    items = torch.full((len(prefixes), width), -1, dtype=torch.int64)
    values = torch.zeros(len(prefixes), width)
    for i, (row_items, counts) in enumerate(counted):
        items[i, : len(row_items)] = torch.from_numpy(row_items)
        values[i, : len(row_items)] = weight * torch.log1p(torch.from_numpy(counts).float())
    return items, values


class SessionBonusScorer(GRU4RecScorer):
    """GRU4Rec with a fixed bonus for the items already in the session."""

    def __init__(self, model: GRU4Rec, weight: float, fast_ranking: bool | None = None) -> None:
        super().__init__(model, fast_ranking)
        self.weight = weight

    def boost(self, out: torch.Tensor, prefixes: Sequence[np.ndarray]) -> Boost:
        return count_boost(prefixes, self.weight)


class HybridScorer(SessionScorer):
    """Late fusion of GRU4Rec's softmax (at temperature ``temperature``) and a kNN baseline's
    normalised scores."""

    def __init__(
        self, gru: GRU4RecScorer, knn: SessionScorer, weight: float, temperature: float = 1.0
    ) -> None:
        super().__init__(gru.n_items)
        self.gru, self.knn, self.weight, self.temperature = gru, knn, weight, temperature

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        return self._mix(self.gru.score_next(prefixes), self.knn.score_next(prefixes))

    def score_sessions(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        return self._mix(self.gru.score_sessions(sessions), self.knn.score_sessions(sessions))

    def _mix(self, gru: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        return mix(gru, normalised(knn), self.weight, self.temperature)


def normalised(knn: torch.Tensor) -> torch.Tensor:
    """A baseline's scores as a distribution per row (all zero where it scores nothing)."""
    knn = knn.to(torch.float32).clamp_min(0)
    total = knn.sum(1, keepdim=True)
    return torch.where(total > 0, knn / total.clamp_min(1e-30), 0.0)


def mix(gru: torch.Tensor, knn: torch.Tensor, weight: float, temperature: float) -> torch.Tensor:
    """The hybrid's scores from GRU4Rec's scores and the baseline's ``normalised`` ones."""
    return blend(torch.softmax(gru / temperature, 1), knn, weight)


def blend(probabilities: torch.Tensor, knn: torch.Tensor, weight: float) -> torch.Tensor:
    """``mix`` once GRU4Rec's softmax at the temperature is taken (the grid shares it)."""
    return (1 - weight) * probabilities + weight * knn


def choose_hybrid(
    gru: GRU4RecScorer,
    knn: SessionScorer,
    valid: pl.DataFrame,
    grid: Sequence[tuple[float, float]],
    metric: Metric,
    batch_size: int = 512,
) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """``choose_weight`` for ``HybridScorer`` over (temperature, weight) settings, in one pass
    over ``valid``: each batch's GRU4Rec and baseline scores are computed once and mixed at
    every setting (a grid of 16 made 16 full passes, each dominated by the same fp32 catalogue
    product). The metrics are those ``evaluate`` gives each ``HybridScorer`` (a test holds it)."""
    sessions, _, _ = test_sessions(valid)
    settings = sorted(grid)
    sums = {s: MetricAccumulator([metric.k], gru.n_items) for s in settings}
    with torch.inference_mode():
        for batch in prediction_batches(sessions, batch_rows(batch_size, gru.n_items)):
            scores = gru.score_sessions(batch)
            near = normalised(knn.score_sessions(batch))
            targets = next_item_targets(batch, scores.device)
            for t, group in groupby(settings, key=lambda s: s[0]):  # sorted: one softmax per T
                probabilities = torch.softmax(scores / t, 1)
                for _, w in group:
                    mixed = blend(probabilities, near, w)
                    ranks = rank_scores(mixed, metric.k, targets=targets).ranks
                    assert ranks is not None
                    sums[(t, w)].add(ranks)
    return _best({s: sums[s].result()[str(metric)] for s in settings})


def choose_weight(
    make: Callable[[W], SessionScorer],
    valid: pl.DataFrame,
    weights: Sequence[W],
    metric: Metric,
    batch_size: int = 512,
) -> tuple[W, dict[W, float]]:
    """The weight (or tuple of settings) whose scorer does best on ``valid`` by ``metric`` (the
    smallest on a tie), and the metric of every one tried."""
    tried: dict[W, float] = {}
    for w in sorted(weights):
        result = evaluate(
            make(w), valid, cutoffs=[metric.k], batch_size=batch_size, show_progress=False
        )
        tried[w] = result.metrics[str(metric)]
    return _best(tried)


def _best(tried: dict[W, float]) -> tuple[W, dict[W, float]]:
    """The best of settings tried in sorted order: only a strictly better one replaces."""
    best = next(iter(tried))
    for w, value in tried.items():
        if value > tried[best]:
            best = w
    return best, tried
