"""GRU4Rec behind the shared ``Recommender`` interface (fit on train, score session prefixes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.evaluation.scorer import Recommender, next_item_targets
from recsys.model.gru4rec import GRU4Rec
from recsys.ranking import FAST_MIN_ITEMS, ranker_for


def pad_sessions(sessions: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) int64 item indices padded with 0, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sessions], dtype=torch.int64)
    padded = torch.zeros(len(sessions), int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(sessions):
        padded[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return padded, lengths


class GRU4RecRecommender(Recommender):
    """A trained (or to-be-trained) GRU4Rec; every session starts from a zero hidden state."""

    name = "gru4rec"

    def __init__(
        self,
        n_items: int,
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        model: GRU4Rec | None = None,
    ) -> None:
        super().__init__(n_items)
        self.model_config = model_config or (model.config if model else ModelConfig())
        self.train_config = train_config or TrainConfig()
        self.model = model
        self.history: list[dict[str, object]] = []
        # Certified low-precision first pass (recsys.ranking); None: by catalogue size.
        self.fast_ranking: bool | None = None

    def fit(self, train: pl.DataFrame) -> GRU4RecRecommender:
        from recsys.training.trainer import train_gru4rec

        result = train_gru4rec(train, self.n_items, self.model_config, self.train_config)
        self.model = result.model
        self.history = result.history
        return self

    @classmethod
    def from_file(cls, path: Path) -> GRU4RecRecommender:
        model, _ = GRU4Rec.load(path)
        return cls(model.n_items, model=model)

    def _require_model(self) -> GRU4Rec:
        if self.model is None:
            raise RuntimeError("GRU4Rec is not trained yet: call fit() or load a model file")
        return self.model

    def session_outputs(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        """Output vectors after every proper prefix: (sum(len - 1), H), session-major."""
        model = self._require_model()
        device = model.item_out.device
        padded, lengths = pad_sessions(sessions)
        return model.prediction_outputs(padded.to(device), lengths.to(device))

    def score_sessions(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        model = self._require_model()
        with torch.inference_mode():
            return model.score_all(self.session_outputs(sessions))

    def rank_sessions(
        self, sessions: Sequence[np.ndarray], ties: str, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ranks (up to ``top_k``) at bf16 speed: see ``recsys.ranking``."""
        model = self._require_model()
        fast = self.fast_ranking
        if fast is None:
            fast = self.n_items >= FAST_MIN_ITEMS
        with torch.inference_mode():
            out = self.session_outputs(sessions)  # (N, H)
            targets = next_item_targets(sessions, out.device)
            ranker = ranker_for(model.item_out, model.item_bias, model)
            result = ranker.top_k(out, top_k, targets=targets, ties=ties, fast=fast)
            assert result.ranks is not None
            return result.ranks.cpu(), result.items.cpu()

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        model = self._require_model()
        with torch.inference_mode():
            padded, lengths = pad_sessions(prefixes)
            device = model.item_out.device
            outs = model.encode_sessions(padded.to(device), lengths.to(device))  # (B, T, H)
            last = outs[torch.arange(len(prefixes)), (lengths - 1).to(device)]  # (B, H)
            return model.score_all(last)
