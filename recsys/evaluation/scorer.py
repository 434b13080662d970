"""The interface evaluation calls: score session prefixes, rank next items.

GRU4Rec and every baseline implement it, so one harness measures all of them (the baselines
also learn from train through it; GRU4Rec is trained by ``recsys.training``). It is not the
product's ``SessionRecommender`` (recsys.serving), which maps original item ids and serves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from recsys.ranking import next_item_targets, prefix_items, proper_prefixes, rank_scores


class SessionScorer(ABC):
    """Scores every catalogue item as the next click of a session.

    Items are internal indices ``0 .. n_items-1`` (the prepared dataset's ``item_idx``).
    """

    name: str = "scorer"

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    @abstractmethod
    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        """Scores (B, n_items) float32 for the item that follows each prefix (non-empty int64 arrays)."""

    def score_sessions(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        """Scores after every proper prefix of every session: (sum(len - 1), n_items), session-major.

        Row for session s, position t scores the next item after ``s[: t + 1]``; its target is
        ``s[t + 1]``. Models with incremental state override this to avoid re-reading prefixes.
        """
        prefixes = proper_prefixes(sessions)
        if not prefixes:
            return torch.empty(0, self.n_items)
        return self.score_next(prefixes)

    def rank_sessions(
        self, sessions: Sequence[np.ndarray], ties: str, top_k: int, exclude_seen: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank of each next-item target and the top ``top_k`` items, for every prediction.

        Ranks up to ``top_k`` are exact, larger ones are ``top_k + 1`` (metrics only look within
        the cut-offs). ``exclude_seen`` leaves each prefix's own items out of the ranking. The
        default scores the whole catalogue; models with a faster exact ranking override it.
        """
        scores = self.score_sessions(sessions)  # (N, n_items)
        exclude = prefix_items(sessions) if exclude_seen else None
        if exclude:
            scores = scores.clone()  # the mask is written in place
        targets = next_item_targets(sessions, scores.device)
        result = rank_scores(scores, top_k, exclude, targets, ties)
        assert result.ranks is not None
        return result.ranks.cpu(), result.items.cpu()
