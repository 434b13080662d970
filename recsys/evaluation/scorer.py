"""The small interface every next-item model shares: fit on train, score session prefixes.

GRU4Rec and every baseline implement it, so one evaluation harness and one serving path work
for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch


def next_item_targets(
    sessions: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The target of every prediction, session-major: each session's clicks after the first."""
    return torch.from_numpy(np.concatenate([s[1:] for s in sessions])).to(device)


class Recommender(ABC):
    """Scores every catalogue item as the next click of a session.

    Items are internal indices ``0 .. n_items-1`` (the prepared dataset's ``item_idx``).
    """

    name: str = "recommender"

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    @abstractmethod
    def fit(self, train: pl.DataFrame) -> Recommender:
        """Learn from train events: columns session_id, item_idx, timestamp, sorted by
        (session start time, session, time). Must not be called with test data."""

    @abstractmethod
    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        """Scores (B, n_items) float32 for the item that follows each prefix (non-empty int64 arrays)."""

    def score_sessions(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        """Scores after every proper prefix of every session: (sum(len - 1), n_items), session-major.

        Row for session s, position t scores the next item after ``s[: t + 1]``; its target is
        ``s[t + 1]``. Models with incremental state override this to avoid re-reading prefixes.
        """
        prefixes = [s[: t + 1] for s in sessions for t in range(len(s) - 1)]
        if not prefixes:
            return torch.empty(0, self.n_items)
        return self.score_next(prefixes)

    def rank_sessions(
        self, sessions: Sequence[np.ndarray], ties: str, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank of each next-item target and the top ``top_k`` items, for every prediction.

        Ranks up to ``top_k`` must be exact; a larger rank may be reported as any value above
        ``top_k`` (metrics only look within the cut-offs). The default scores the whole catalogue.
        """
        from recsys.evaluation.harness import target_ranks

        scores = self.score_sessions(sessions)  # (N, n_items)
        ranks = target_ranks(scores, next_item_targets(sessions, scores.device), ties)
        top = torch.topk(scores, min(top_k, self.n_items), dim=1).indices
        return ranks.cpu(), top.cpu()
