"""The repeat-aware readout (``model.readout: repeat``): the session's own items, scored from
the session itself, added to the catalogue scores.

GRU4Rec reaches an item the visitor already clicked only through its hidden state, yet on
e-commerce logs a fifth (Diginetica) to a half of the next clicks return to such an item. This
readout gives each of the session's last ``repeat_window`` items a bonus

    bonus_j = τ · g(h) · log(1 + Σ_{t: i_t = j} λ^age_t),   g(h) = softplus(u·h + c),  λ = σ(θ)

on top of ``h · w_j + b_j``: a learned gate (how much this session is in a "repeat mode",
RepeatNet's idea, Ren et al. AAAI 2019) times a recency-weighted count (λ learned too). It is
additive in score space, so the certified ranker works unchanged, and ``g ≡ w, λ = 1, τ = 1`` is
exactly the fixed session-item bonus ``w · log(1 + count)``.

τ is the temperature of the catalogue scores: the readout is learned as the likelihood of
softmax(s / τ + g(h) · log(...)) (``recsys.training.readout_loss``), because a trained GRU4Rec's scores
are over-confident (on the RSC15 sample the likelihood wants them at about half their scale)
and the bonus that maximises the likelihood of uncalibrated scores is far too small to rank well.
Ranking by s / τ + g · log(...) is ranking by s + bonus, so every scoring path adds the bonus.

History is a (B, L) tensor of item indices, most recent first, ``-1`` where the session is
shorter than the window. The slot's history resets with the slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NO_ITEM = -1  # an empty history position
GATE_INIT = -3.0  # softplus(-3) ≈ 0.05: the readout starts as (nearly) plain GRU4Rec


class RepeatReadout(nn.Module):
    """Gate u (H,), c (1,), recency logit θ (1,) and log-temperature (1,): dense parameters."""

    def __init__(self, hidden: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.gate_w = nn.Parameter(torch.zeros(hidden))
        self.gate_b = nn.Parameter(torch.full((1,), GATE_INIT))
        self.decay_logit = nn.Parameter(torch.zeros(1))  # λ = 0.5 at the start
        self.log_temperature = nn.Parameter(torch.zeros(1))  # τ = 1 at the start

    def gate(self, out: torch.Tensor) -> torch.Tensor:
        """g(h) >= 0 per row: (B,)."""
        return F.softplus(out @ self.gate_w + self.gate_b)

    def recency(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Σ_t λ^age [history_t = item] for every row's ``items`` (B, C), or shared items (C,)."""
        cand = items.unsqueeze(0) if items.dim() == 1 else items
        match = history.unsqueeze(2) == cand.unsqueeze(1)  # (B, L, C)
        weights = self.age_weights(match.shape[1], match.device)
        return torch.einsum("blc,l->bc", match.to(weights.dtype), weights)

    def age_weights(self, length: int, device: torch.device) -> torch.Tensor:
        """λ^age for the history positions 0 .. length - 1, most recent first: (L,)."""
        ages = torch.arange(length, device=device, dtype=torch.float32)
        return torch.sigmoid(self.decay_logit) ** ages

    def bonus(self, out: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The additive score of ``items`` (B, C) or (C,) for each row of ``out`` (B, H)."""
        weight = self.gate(out) * torch.exp(self.log_temperature)  # τ · g(h)
        return weight.unsqueeze(1) * torch.log1p(self.recency(history, items))

    def forward(
        self, out: torch.Tensor, history: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        return self.bonus(out, history, items)

    def boost(self, out: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a catalogue ranking adds: each row's distinct history items (a repeated one and
        empty positions are ``NO_ITEM``) and their bonus, (B, L) each."""
        items = distinct_history(history)
        values = self.bonus(out, history, items.clamp_min(0))
        return items, values.masked_fill(items == NO_ITEM, 0.0)


def distinct_history(history: torch.Tensor) -> torch.Tensor:
    """History with every repeat of an item after its most recent position set to NO_ITEM."""
    same = history.unsqueeze(2) == history.unsqueeze(1)  # (B, L, L)
    window = history.shape[1]
    earlier = torch.ones(window, window, dtype=torch.bool, device=history.device).tril(-1)  # l' < l
    repeated = (same & earlier).any(2)
    return history.masked_fill(repeated, NO_ITEM)


def recent_items(prefixes: Sequence[Sequence[int]], window: int) -> torch.Tensor:
    """The last ``window`` items of each prefix, most recent first, NO_ITEM-padded: (M, L)."""
    out = np.full((len(prefixes), window), NO_ITEM, dtype=np.int64)
    for i, p in enumerate(prefixes):
        tail = np.asarray(p[-window:], dtype=np.int64)[::-1]
        out[i, : len(tail)] = tail
    return torch.from_numpy(out)


def push(history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """A click for every slot: ``items`` (B,) become the most recent position."""
    return torch.cat((items.unsqueeze(1), history[:, :-1]), 1)
