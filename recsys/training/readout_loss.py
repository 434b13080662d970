"""The repeat readout's own loss (``model.readout: repeat``), learned inside the training loop.

The readout is a head on the network, not a part of it: its loss reads the step's GRU outputs
and item scores *detached*, so the network and the item matrices receive exactly the gradients
of the plain GRU4Rec step (same seed, same weights with the readout on or off) and the readout
can only add to them. Letting its gradient into the network was tried and lost on validation:
the network unlearned what the readout covered, and the sum ranked worse than the plain model.

The loss is the full-catalogue softmax log-likelihood of the combined scores (s + b) / τ
(τ: the readout's temperature, b = τ g(h) log(...): ``RepeatReadout.bonus``), where b is
non-zero only on the slot's history H. With a = 1/τ:

    -log p(t) = -a(s_t + b_t) + log( Z_a + Σ_{j ∈ H} e^{a s_j} (e^{a b_j} - 1) ),   Z_a = Σ_all e^{a s_j}

Only the history terms are computed exactly (L items per slot); Z_a comes from the step's
popularity-sampled negatives by importance sampling, Z_a ≈ (P / n) Σ_k e^{a s_k} / pop_k^α
with P = Σ_all pop^α. Sampled negatives alone would not do: a session's items are rarely among
them, so boosting them would never cost, and the gate would only grow.

A network trained by a ranking loss (BPR-max, TOP1-max) gives scores that are not
log-probabilities at any one temperature, and the sampled Z above is then biased where it
matters (on Diginetica τ fell to 0.16, e^{s/τ} is carried by a few top items that 2,048 samples
miss, and the gate closed). There the head learns by the network's own ranking criterion
instead (``ranking_readout_loss``): BPR-max of the target's combined score against the step's
negatives and, exactly and with their bonus, the slot's other history items.
"""

from __future__ import annotations

import math

import torch

from recsys.model.gru4rec import GRU4Rec
from recsys.model.readout import RepeatReadout

NEG = -1e30  # a masked negative: weight 0 in the softmax, yet no NaN when a row has none left


class SampledPartition:
    """log Z of each row from the step's sampled negatives: the importance weights of a draw."""

    def __init__(
        self,
        support: torch.Tensor,
        alpha: float,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        log_pop = torch.log(support.to(torch.float64).clamp_min(1e-300))
        weight = support.to(torch.float64).clamp_min(0) ** alpha
        self.log_total = math.log(float(weight.sum()))  # log P
        self.shift = (alpha * log_pop).to(dtype).to(device)  # log pop^α per item

    def __call__(
        self, sample_scores: torch.Tensor, samples: torch.Tensor, scale: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """(B, n) scores of the n shared samples -> (B,) estimates of log Σ_all e^{scale · s}."""
        weighted = scale * sample_scores - self.shift.index_select(0, samples)
        return torch.logsumexp(weighted, 1) + self.log_total - math.log(len(samples))


def readout_loss(
    readout: RepeatReadout,
    partition: SampledPartition,
    out: torch.Tensor,
    target_scores: torch.Tensor,
    negatives: tuple[torch.Tensor, torch.Tensor],
    history_scores: torch.Tensor,
    history: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Summed negative log-likelihood of the targets under (s + b) / τ, differentiable in the
    readout's parameters only (τ included). ``out`` (B, H), ``target_scores`` (B,), ``negatives`` (the
    (B, n) scores of n sampled items and the items) and ``history_scores`` (B, L, the catalogue
    scores of ``history``) arrive detached."""
    a = torch.exp(-readout.log_temperature)  # 1 / τ
    log_z = partition(negatives[0], negatives[1], a)  # (B,)
    items, bonus = readout.boost(out, history)  # (B, L): distinct history items, their bonus
    target_bonus = readout.bonus(out, history, targets.unsqueeze(1)).squeeze(1)  # (B,)
    # log(Z_a + Σ_H e^{a s_j} (e^{a b_j} - 1)) as one logsumexp; every term is >= 0 (b >= 0), so
    # no estimate error can make the sum negative. Empty and repeated history positions (bonus
    # 0) take no part: their log-term is -inf, computed from a placeholder so that no 0/0
    # enters the gradient.
    empty = items < 0
    log_terms = a * history_scores + _log_expm1((a * bonus).masked_fill(empty, 1.0))
    log_terms = log_terms.masked_fill(empty, float("-inf"))
    log_denominator = torch.logsumexp(torch.cat((log_z.unsqueeze(1), log_terms), 1), 1)
    return (log_denominator - a * (target_bonus + target_scores)).sum()


def ranking_readout_loss(
    readout: RepeatReadout,
    out: torch.Tensor,
    target_scores: torch.Tensor,
    negatives: tuple[torch.Tensor, torch.Tensor],
    history_scores: torch.Tensor,
    history: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Summed BPR-max, -log Σ_j w_j σ(r_t - r_j) with w the softmax of the negatives' r, of
    the combined scores r = s + b, differentiable in the readout's parameters only. Negatives:
    the step's columns (``negatives``: (R, C) scores, (C,) items) that are neither the row's
    target nor in its history, and the row's distinct history items other than the target,
    which carry their bonus."""
    items, bonus = readout.boost(out, history)  # (R, L)
    target_r = target_scores + readout.bonus(out, history, targets.unsqueeze(1)).squeeze(1)
    hist_r = (history_scores + bonus).masked_fill((items < 0) | (items == targets[:, None]), NEG)
    cols = negatives[1].unsqueeze(0)  # (1, C)
    covered = (cols == targets[:, None]) | (cols.unsqueeze(2) == history.unsqueeze(1)).any(2)
    r = torch.cat((negatives[0].masked_fill(covered, NEG), hist_r), 1)  # (R, C + L)
    weights = torch.softmax(r, 1)
    ranking = (weights * torch.sigmoid(target_r.unsqueeze(1) - r)).sum(1)
    return -torch.log(ranking + 1e-24).sum()


def step_readout_loss(
    model: GRU4Rec,
    partition: SampledPartition,
    out: torch.Tensor,
    scores: torch.Tensor,
    samples: torch.Tensor,
    history: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    ranking: bool = False,
) -> torch.Tensor:
    """The readout's loss in a training step, on the slots ``rows``: ``out`` (B, H) and
    ``scores`` (B, B + n) as the step computed them (they are detached here), ``history``
    (B, L), ``targets`` (B,). ``ranking``: the BPR-max head (for networks trained by a ranking
    loss) instead of the likelihood."""
    readout = model.readout
    assert readout is not None
    b = len(targets)
    out, scores, history = out.detach()[rows], scores.detach()[rows], history[rows]
    with torch.no_grad():
        items = history.clamp_min(0)  # (R, L)
        hist_scores = torch.einsum("rlh,rh->rl", model.item_out[items], out)
        hist_scores = hist_scores + model.item_bias[items]
    # the samples, or with none the in-batch targets (clicks: the popularity sample itself)
    negatives = (scores[:, b:], samples) if len(samples) else (scores[:, :b], targets)
    target_scores = scores[torch.arange(len(rows), device=rows.device), rows]
    if ranking:  # every column of the step: the in-batch targets and the shared samples
        columns = (scores, torch.cat((targets, samples)))
        return ranking_readout_loss(
            readout, out, target_scores, columns, hist_scores, history, targets[rows]
        )
    return readout_loss(
        readout, partition, out, target_scores, negatives, hist_scores, history, targets[rows]
    )


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(e^x - 1) for x > 0 without overflow (large x), cancellation or a 0/0 gradient
    (x so small, or a gate so closed, that it rounds to 0)."""
    large = x > 20.0
    small = torch.log(torch.expm1(x.clamp(1e-30, 20.0)))
    return torch.where(large, x + torch.log1p(-torch.exp(-x.clamp_min(20.0))), small)
