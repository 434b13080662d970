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
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from recsys.model.gru4rec import GRU4Rec
from recsys.model.readout import NO_ITEM, RepeatReadout, distinct_history

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
        shift, offset = self.weights(samples)
        return torch.logsumexp(scale * sample_scores - shift, 1) + offset

    def weights(self, samples: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The draw's log importance weights, as (log pop^α per sample (n,), log P - log n):
        log Z ≈ logsumexp(s - shift) + offset."""
        return self.shift.index_select(0, samples), self.offset(len(samples))

    def offset(self, n: int) -> float:
        """log P - log n: the weights' common term for a draw of ``n``."""
        return self.log_total - math.log(n)


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
    shift, offset = partition.weights(negatives[1])
    step = (out, target_scores, negatives[0], shift, offset, history_scores, history, targets)
    return _ReadoutLikelihood.apply(  # type: ignore[no-any-return]
        lambda *params: _likelihood(*step, *params), *_parameters(readout)
    )


def _parameters(readout: RepeatReadout) -> tuple[torch.Tensor, ...]:
    return readout.gate_w, readout.gate_b, readout.decay_logit, readout.log_temperature


class _ReadoutLikelihood(torch.autograd.Function):
    """The readout's likelihood as one autograd node: its gradient written out and computed in
    the forward pass, by ``_likelihood`` (torch ops) or by the compiled ``readout_step_nll``.

    The head has four small parameters and reads ~a dozen (R, L) tensors per step, so autograd
    through the composition cost more than the network's own step on small settings (0.9 ms of
    a 4 ms step at 100 units, batch 32): per-op overhead, not arithmetic. Here it is one node.

    With a = 1/τ, x_l = a b_l = g f_l (f = log(1 + Σ λ^age [match])), the per-row loss is
    D - a s_t - g f_t with D = log(Z_a + Σ_H e^{a s_l} (e^{x_l} - 1)). Writing p_0 = Z_a / e^D
    and π_l = e^{a s_l + x_l - D} (the history term's weight times d log(e^x - 1)/dx):
    ∂/∂a = p_0 E_q[s] + Σ p_l s_l - s_t,  ∂/∂g = Σ π_l f_l - f_t,
    ∂/∂λ = g (Σ π_l f_l' - f_t'),  and the chain rule to u, c (g = softplus(u·h + c)),
    θ (λ = σ(θ)) and log τ (a = e^{-log τ}). The tests hold it to finite differences.
    """

    @staticmethod
    def forward(
        ctx: Any, compute: Callable[..., Sequence[torch.Tensor]], *params: torch.Tensor
    ) -> torch.Tensor:
        """``compute(gate_w, gate_b, decay_logit, log_temperature)`` (detached) -> (the summed
        loss, its gradient in each): ``_likelihood``, or the compiled ``readout_step_nll``."""
        loss, *grads = compute(*(p.detach() for p in params))
        ctx.save_for_backward(*grads)
        return loss  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(grad * g for g in ctx.saved_tensors))


def _likelihood(
    out: torch.Tensor,
    target_scores: torch.Tensor,
    sample_scores: torch.Tensor,
    shift: torch.Tensor,
    offset: float,
    history_scores: torch.Tensor,
    history: torch.Tensor,
    targets: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    decay_logit: torch.Tensor,
    log_temperature: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The likelihood and its gradient in torch ops (the arithmetic of kernels_readout.cpp)."""
    a = torch.exp(-log_temperature)  # (1,)
    pre = torch.addmv(gate_b, out, gate_w)  # (R,)
    g, dg = F.softplus(pre), torch.sigmoid(pre)
    lam = torch.sigmoid(decay_logit)
    window = history.shape[1]
    ages = torch.arange(window, device=out.device, dtype=out.dtype)
    powers = lam**ages
    weights = torch.stack((powers, ages * powers / lam), 1)  # (L, 2): λ^age, d/dλ
    keep = distinct_history(history) != NO_ITEM  # each item at its most recent position
    # counts and their λ-slope at every history position (rows 0..L-1) and the target (L)
    same = history.unsqueeze(2) == history.unsqueeze(1)  # (R, L, L)
    match = torch.cat((same, (history == targets.unsqueeze(1)).unsqueeze(1)), 1)
    counts = match.to(out.dtype) @ weights  # (R, L + 1, 2)
    f = torch.log1p(counts[..., 0])  # (R, L + 1)
    f_slope = counts[..., 1] / (1.0 + counts[..., 0])
    x = (g.unsqueeze(1) * f[:, :window]).clamp_min(1e-30)  # a · bonus, > 0
    weighted = a * sample_scores - shift  # (R, n)
    log_z = torch.logsumexp(weighted, 1, keepdim=True)
    scaled = a * history_scores
    log_terms = scaled + torch.where(x > 20.0, x + torch.log1p(-torch.exp(-x)), x.expm1().log())
    log_terms = log_terms.masked_fill(~keep, float("-inf"))
    log_d = torch.logsumexp(torch.cat((log_z + offset, log_terms), 1), 1, keepdim=True)
    loss = log_d.squeeze(1) - a * target_scores - g * f[:, window]
    p_z = torch.exp(log_z + offset - log_d).squeeze(1)  # (R,)
    p = torch.exp(log_terms - log_d)  # (R, L)
    pi = torch.exp(scaled + x - log_d).masked_fill(~keep, 0.0)
    mean_q = (torch.softmax(weighted, 1) * sample_scores).sum(1)  # E_q[s] = ∂ log Z_a/∂a
    d_a = p_z * mean_q + (p * history_scores).sum(1) - target_scores
    f_t, slope_t = f[:, window], f_slope[:, window]
    d_g = (pi * f[:, :window]).sum(1) - f_t
    d_lam = g * ((pi * f_slope[:, :window]).sum(1) - slope_t)
    d_pre = d_g * dg
    return (
        loss.sum(),
        out.t() @ d_pre,
        d_pre.sum().reshape(1),
        (d_lam.sum() * lam * (1.0 - lam)).reshape(1),
        -(d_a.sum() * a).reshape(1),
    )


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
    kernels: ModuleType | None = None,
) -> torch.Tensor:
    """The readout's loss in a training step, on the slots ``rows``: ``out`` (B, H) and
    ``scores`` (B, B + n) as the step computed them (they are detached here), ``history``
    (B, L), ``targets`` (B,). ``ranking``: the BPR-max head (for networks trained by a ranking
    loss) instead of the likelihood; ``kernels``: the likelihood, with the gathers below, in one
    compiled pass for float32 on a CPU."""
    readout = model.readout
    assert readout is not None
    b = len(targets)
    out, scores = out.detach(), scores.detach()
    # the samples, or with none the in-batch targets (clicks: the popularity sample itself)
    neg_begin, neg_items = (b, samples) if len(samples) else (0, targets)
    if kernels is not None and not ranking and out.dtype == torch.float32 and out.is_cpu:
        step = (out.contiguous(), scores.contiguous(), rows, neg_begin, neg_items, partition.shift)
        fixed = (partition.offset(len(neg_items)), history, targets)
        tables = (model.item_out.detach(), model.item_bias.detach())
        return _ReadoutLikelihood.apply(  # type: ignore[no-any-return]
            lambda *params: kernels.readout_step_nll(*step, *fixed, *tables, *params),
            *_parameters(readout),
        )
    out, scores = out.index_select(0, rows), scores.index_select(0, rows)
    history = history.index_select(0, rows)
    with torch.no_grad():
        items = history.clamp_min(0)  # (R, L)
        hist_scores = torch.einsum("rlh,rh->rl", model.item_out[items], out)
        hist_scores = hist_scores + model.item_bias[items]
    target_scores = scores[torch.arange(len(rows), device=rows.device), rows]
    if ranking:  # every column of the step: the in-batch targets and the shared samples
        columns = (scores, torch.cat((targets, samples)))
        return ranking_readout_loss(
            readout, out, target_scores, columns, hist_scores, history, targets[rows]
        )
    negatives = (scores[:, neg_begin : neg_begin + len(neg_items)], neg_items)
    step_rows = (out, target_scores, negatives, hist_scores, history, targets[rows])
    return readout_loss(readout, partition, *step_rows)
