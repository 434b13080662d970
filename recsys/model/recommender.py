"""GRU4Rec behind the shared ``Recommender`` interface (fit on train, score session prefixes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.recommender import Recommender, next_item_targets


def pad_sessions(sessions: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) int64 item indices padded with 0, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sessions], dtype=torch.int64)
    padded = torch.zeros(len(sessions), int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(sessions):
        padded[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return padded, lengths


FAST_CANDIDATES = 48
_BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_FP32_UNIT = 2.0**-24


def exact_topk_ranks(
    model: GRU4Rec, out: torch.Tensor, targets: torch.Tensor, ties: str, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of ``targets`` (exact when <= top_k, else top_k + 1) and the exact top-k items."""
    from recsys.evaluation import rank_from_counts, target_ranks

    weights, bias = model.item_out, model.item_bias
    k = min(top_k, model.n_items)
    m = min(max(FAST_CANDIDATES, 2 * k), model.n_items)
    cache = getattr(model, "_bf16_cache", None)
    if cache is None or cache[0] is not weights or cache[1] != weights._version:
        # [w_j, b_j] per item in bf16, so the bias rides along in the same GEMM: (n_items, H + 1)
        extended = torch.cat((weights.detach(), bias.detach().unsqueeze(1)), 1).bfloat16()
        scale = float(weights.detach().norm(dim=1).max()), float(bias.detach().abs().max())
        model._bf16_cache = (weights, weights._version, extended, scale)  # type: ignore[attr-defined]
    _, _, w16, (w_norm_max, b_max) = model._bf16_cache  # type: ignore[attr-defined]
    ones = torch.ones(len(out), 1, dtype=out.dtype, device=out.device)
    approx = torch.mm(torch.cat((out, ones), 1).bfloat16(), w16.t())  # (N, n_items) bf16
    # |A - S| <= input rounding (2u + u²)·Σ|x_k y_k| + output rounding u·|S| + fp32 sums,
    # and Σ|x_k y_k| + |b| <= ||x||·max||w|| + max|b| (Cauchy-Schwarz), for every item.
    h = out.shape[1]
    err = (3.02 * _BF16_UNIT + 2 * (h + 1) * _FP32_UNIT) * (out.norm(dim=1) * w_norm_max + b_max)
    cand_scores, cand = torch.topk(approx, m, dim=1)  # (N, m)
    cand_scores = cand_scores.float()
    complete = cand_scores[:, m - 1] < cand_scores[:, k - 1] - 2 * err
    # Exact fp32 scores of the candidates and of the target, in one batched product.
    idx = torch.cat((cand, targets.view(-1, 1)), dim=1)  # (N, m + 1)
    exact = torch.bmm(weights[idx], out.unsqueeze(2)).squeeze(2) + bias[idx]  # (N, m + 1)
    target_score = exact[:, m : m + 1]
    cand_exact = exact[:, :m]
    is_target = cand == targets.view(-1, 1)
    others = cand_exact.masked_fill(is_target, float("-inf"))
    above = (others > target_score).sum(1)
    at_least = (others >= target_score).sum(1) + 1  # + the target itself
    ranks = rank_from_counts(ties, above, at_least)
    top_vals, top_pos = torch.topk(cand_exact, k, dim=1)
    inside = target_score.squeeze(1) >= top_vals[:, k - 1]
    ranks = torch.where(inside, ranks, torch.full_like(ranks, k + 1))
    top = cand.gather(1, top_pos)
    # A target inside the exact top-k must be among the candidates; if rounding ever broke the
    # bound, that row is rescored in full rather than trusted.
    suspicious = inside & ~is_target.any(1)
    fallback = torch.nonzero(~complete | suspicious).flatten()
    if len(fallback):
        scores = torch.addmm(bias, out[fallback], weights.t())
        ranks[fallback] = target_ranks(scores, targets[fallback], ties)
        top[fallback] = torch.topk(scores, k, dim=1).indices
    return ranks.cpu(), top.cpu()


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
        self.fast_ranking = True

    def fit(self, train: pl.DataFrame) -> GRU4RecRecommender:
        from recsys.training import train_gru4rec

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
        """Exact ranks (up to ``top_k``) at bf16 speed: a cheap pass settles most items, fp32
        settles the rest.

        Pass 1 scores the catalogue with bf16 inputs, ``A``; a rigorous per-row bound ``e`` on
        ``|A - S|`` (S = fp32 scores) follows from the bf16 rounding of the inputs and of the
        output. Every item of the exact top ``top_k`` has ``A >= A_(top_k) - 2e``, so the ``m``
        best items of ``A`` contain it whenever ``A_(m) < A_(top_k) - 2e``; those candidates
        (and the target) are rescored in fp32, which gives the exact top-k and, for a target
        inside it, its exact rank. Rows where the band is wider than ``m`` items fall back to
        full fp32 scoring.
        """
        model = self._require_model()
        if not self.fast_ranking or self.n_items < 4 * FAST_CANDIDATES:
            return super().rank_sessions(sessions, ties, top_k)
        with torch.inference_mode():
            out = self.session_outputs(sessions)  # (N, H)
            return exact_topk_ranks(
                model, out, next_item_targets(sessions, out.device), ties, top_k
            )

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        model = self._require_model()
        with torch.inference_mode():
            padded, lengths = pad_sessions(prefixes)
            device = model.item_out.device
            outs = model.encode_sessions(padded.to(device), lengths.to(device))  # (B, T, H)
            last = outs[torch.arange(len(prefixes)), (lengths - 1).to(device)]  # (B, H)
            return model.score_all(last)
