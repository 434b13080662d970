"""Two simple fusions of GRU4Rec with the session itself, for the results table.

- ``SessionBonusScorer``: GRU4Rec's scores plus ``w · log(1 + count of the item in the
  prefix)``. Adding a per-row constant (GRU4Rec's log-softmax normaliser) changes no rank, so
  this is exactly "log-softmax + bonus"; it is the constant that the learned repeat readout
  (``model.readout: repeat``) must beat, and it ranks through the same certified ranker.
- ``HybridScorer``: a late fusion with a session-kNN baseline, ``(1 - a) · softmax(GRU4Rec / T)
  + a · kNN / Σ kNN`` (both rows normalised to distributions; the temperature T turns scores
  that are no log-probabilities, as those of a BPR-max network, into a usable distribution).

The weights (and T) are chosen on ``valid`` by ``choose_weight``, never on ``test``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import polars as pl
import torch

from recsys.core.metrics import Metric
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.evaluation.scorer import SessionScorer
from recsys.model.gru4rec import GRU4Rec
from recsys.ranking import Boost

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
        knn = knn.to(torch.float32).clamp_min(0)
        total = knn.sum(1, keepdim=True)
        knn = torch.where(total > 0, knn / total.clamp_min(1e-30), 0.0)
        return (1 - self.weight) * torch.softmax(gru / self.temperature, 1) + self.weight * knn


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
    best = next(iter(tried))
    for w, value in tried.items():  # in sorted order: only a strictly better one replaces
        if value > tried[best]:
            best = w
    return best, tried
