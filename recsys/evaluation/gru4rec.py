"""A trained GRU4Rec behind the scorer interface that the evaluation harness calls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recsys.evaluation.scorer import SessionScorer
from recsys.model.artifact import TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.model.kernels import ranking_kernels
from recsys.ranking import (
    Boost,
    CatalogueRanker,
    fast_by_default,
    next_item_targets,
    prefix_items,
    proper_prefixes,
    ranker_for,
)


class GRU4RecScorer(SessionScorer):
    """A trained GRU4Rec; every session starts from a zero hidden state.

    ``fast_ranking`` picks the certified low-precision first pass of ``recsys.ranking``
    (None: by catalogue size); either way the ranks are those of full fp32 scoring.
    """

    name = "gru4rec"

    def __init__(self, model: GRU4Rec, fast_ranking: bool | None = None) -> None:
        super().__init__(model.n_items)
        self.model = model
        self.fast_ranking = fast_ranking

    @classmethod
    def from_file(cls, path: Path) -> GRU4RecScorer:
        return cls(TrainedModel.load(path).network)

    @property
    def ranker(self) -> CatalogueRanker:
        """The network's catalogue ranker (cached on it by ``recsys.ranking.ranker_for``)."""
        return ranker_for(self.model.item_out, self.model.item_bias, self.model, ranking_kernels)

    def boost(self, out: torch.Tensor, prefixes: Sequence[np.ndarray]) -> Boost | None:
        """What the ranking adds to the catalogue scores after each prefix: the network's
        repeat readout (None without one); a fusion overrides this one method."""
        return self.model.prefix_boosts(out, prefixes)

    def score_sessions(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.session_outputs(sessions)
            return self.ranker.full_scores(out, boost=self.boost(out, proper_prefixes(sessions)))

    def rank_sessions(
        self, sessions: Sequence[np.ndarray], ties: str, top_k: int, exclude_seen: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ranks (up to ``top_k``) at low-precision speed: see ``recsys.ranking``."""
        fast = self.fast_ranking
        if fast is None:
            fast = fast_by_default(self.n_items)
        with torch.inference_mode():
            out = self.model.session_outputs(sessions)  # (N, H)
            targets = next_item_targets(sessions, out.device)
            exclude = prefix_items(sessions) if exclude_seen else None
            boost = self.boost(out, proper_prefixes(sessions))
            result = self.ranker.top_k(
                out, top_k, exclude=exclude, targets=targets, ties=ties, fast=fast, boost=boost
            )
            assert result.ranks is not None
            return result.ranks.cpu(), result.items.cpu()

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.last_outputs(prefixes)
            return self.ranker.full_scores(out, boost=self.boost(out, prefixes))
