"""One training step with the repeat readout (``model.readout: repeat``).

The same session-parallel, one-step-backprop step as ``Trainer.train_step``, with two changes:
every scored item gets the readout's bonus for the slot's history, and each slot's own
history items are scored as extra negatives. Without those extra columns the readout would
learn from positives alone (a session's items are rarely among the popularity-sampled
negatives), and its gate would only grow; with them, boosting the session's items costs
whenever the next click goes elsewhere, as the full-catalogue softmax at inference does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch

from recsys.config import TrainConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.model.losses import bpr_max, cross_entropy, top1_max
from recsys.model.matmul import linear
from recsys.model.optimizer import RowAdagradM
from recsys.model.readout import NO_ITEM, distinct_history
from recsys.model.sampling import SampleStore
from recsys.training.leaves import apply_updates, step_rows


class Trainer(Protocol):
    """What a step needs of ``recsys.training.trainer.Trainer`` (which calls this module)."""

    model: GRU4Rec
    config: TrainConfig
    sampler: SampleStore
    optimizer: RowAdagradM
    log_pop: torch.Tensor
    bf16: bool
    kernels: ModuleType | None


MASKED = -1e9  # finite, so that BPR-max's bpreg·s·r² stays 0 · r² = 0 rather than NaN


def repeat_train_step(
    trainer: Trainer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    hidden: list[torch.Tensor],
    history: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``history`` (B, L): each slot's last items, current input first, NO_ITEM-padded."""
    model, cfg = trainer.model, trainer.config
    readout = model.readout
    assert readout is not None
    b, window = history.shape
    samples = trainer.sampler.draw()
    out_idx = torch.cat((targets, samples))  # (C,) = (B + n_sample,)
    leaves = step_rows(model, inputs, out_idx)

    # The slot's own items as extra columns, each once, and only where no other column scores
    # the same item already (the target included: it is the positive, not a negative).
    hist_items = distinct_history(history)  # (B, L)
    match = history.unsqueeze(2) == out_idx.view(1, 1, -1)  # (B, L, C)
    keep = (hist_items != NO_ITEM) & ~match.any(2)  # (B, L)
    kept = hist_items[keep]  # (K,)
    hist_rows = model.item_out.detach().index_select(0, kept).requires_grad_()  # (K, H)
    hist_bias = model.item_bias.detach().index_select(0, kept).requires_grad_()

    out, hidden = model.step(
        leaves.x, hidden, train=True, bf16=trainer.bf16, kernels=trainer.kernels
    )
    gate = readout.gate(out).unsqueeze(1)  # (B, 1)
    recency = readout.counted(match)  # (B, C)
    scores = linear(out, leaves.item_rows, leaves.bias_rows, trainer.bf16)
    scores = scores.index_select(1, leaves.out_inv)
    scores = scores + gate * torch.log1p(recency)  # (B, C)
    row_of = keep.nonzero()[:, 0]  # (K,) the slot of each kept history column
    kept_scores = (hist_rows * out[row_of]).sum(1) + hist_bias  # (K,)
    kept_scores = kept_scores + gate.squeeze(1)[row_of] * torch.log1p(
        readout.recency(history[row_of], kept.unsqueeze(1)).squeeze(1)
    )
    extra = torch.full((b, window), MASKED, device=out.device).masked_scatter(keep, kept_scores)
    all_scores = torch.cat((scores, extra), 1)  # (B, C + L)
    loss = _loss(trainer, all_scores, out_idx, hist_items, keep) / cfg.batch_size
    loss.backward()

    # no kept history column in the whole batch: no gradient reached those (empty) leaves
    hist_grad = hist_rows.grad if hist_rows.grad is not None else torch.zeros_like(hist_rows)
    bias_grad = hist_bias.grad if hist_bias.grad is not None else torch.zeros_like(hist_bias)
    apply_updates(trainer.optimizer, model, leaves, (kept, hist_grad, bias_grad))
    return loss.detach(), [h.detach() for h in hidden]


def _loss(
    trainer: Trainer,
    scores: torch.Tensor,
    out_idx: torch.Tensor,
    hist_items: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """The configured loss over (B, C + L); logQ treats a history column like a target (it is
    in the candidate set by the session, not by the popularity sampler)."""
    cfg = trainer.config
    if cfg.loss == "cross-entropy":
        if cfg.logq > 0:
            b = len(scores)
            logp = trainer.log_pop[out_idx].clone()  # (C,)
            logp[b:] *= cfg.sample_alpha
            hist = trainer.log_pop[hist_items.clamp_min(0)].masked_fill(~keep, 0.0)  # (B, L)
            shift = torch.cat((logp.expand(b, -1), hist), 1)
            scores = scores - cfg.logq * shift
        return cross_entropy(scores)
    if cfg.loss == "bpr-max":
        return bpr_max(scores, cfg.bpreg, cfg.elu_param, trainer.kernels)
    return top1_max(scores)
