"""GRU4Rec's listwise losses over a score matrix with the positives on the diagonal.

Scores ``R`` are (B, B + n_sample): row i is slot i, column j < B is slot j's target (so the
diagonal holds each row's positive; the other targets are in-batch negatives, which are
popularity-sampled), columns j >= B are the shared extra samples. Each function returns the
*sum* over rows; the trainer divides by the batch size, as GRU4Rec does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-24


def cross_entropy(scores: torch.Tensor, logq_shift: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy of the diagonal; ``logq_shift`` (B + n_sample,) is subtracted from
    every column's score to undo the popularity bias of the sampled negatives (logQ correction)."""
    if logq_shift is not None:
        scores = scores - logq_shift
    logp = torch.log_softmax(scores, dim=1)  # (B, B + n_sample)
    return -torch.diagonal(logp).sum()


def _negative_weights(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's negatives only (the positive, on the diagonal, is masked)."""
    b = scores.shape[0]
    masked = scores.clone()
    masked[:, :b].fill_diagonal_(float("-inf"))
    return torch.softmax(masked, dim=1)  # (B, B + n_sample), zero on the diagonal


def bpr_max(scores: torch.Tensor, bpreg: float, elu_param: float = 0.0) -> torch.Tensor:
    """BPR-max (Hidasi & Karatzoglou 2018): -log Σ_j s_j σ(r_i - r_j) + bpreg Σ_j s_j r_j².

    ``elu_param`` > 0 applies ELU to the scores first (the best settings use it); 0 = linear.
    """
    if elu_param > 0:
        scores = F.elu(scores, alpha=elu_param)
    weights = _negative_weights(scores)
    positive = torch.diagonal(scores).unsqueeze(1)  # (B, 1)
    ranking = (weights * torch.sigmoid(positive - scores)).sum(dim=1)
    reg = (weights * scores.square()).sum(dim=1)
    return (-torch.log(ranking + _TINY) + bpreg * reg).sum()


def top1_max(scores: torch.Tensor) -> torch.Tensor:
    """TOP1-max: Σ_j s_j (σ(r_j - r_i) + σ(r_j²)), weights as in BPR-max."""
    weights = _negative_weights(scores)
    positive = torch.diagonal(scores).unsqueeze(1)
    terms = torch.sigmoid(scores - positive) + torch.sigmoid(scores.square())
    return (weights * terms).sum()
