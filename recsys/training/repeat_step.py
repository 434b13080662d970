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
from recsys.training.leaves import step_rows


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
    x, item_rows, bias_rows = leaves.x, leaves.item_rows, leaves.bias_rows
    out_rows, out_inv, in_rows, in_table = (
        leaves.out_rows,
        leaves.out_inv,
        leaves.in_rows,
        leaves.in_table,
    )

    # The slot's own items as extra columns, each once, and only where no other column scores
    # the same item already (the target included: it is the positive, not a negative).
    hist_items = distinct_history(history)  # (B, L)
    match = history.unsqueeze(2) == out_idx.view(1, 1, -1)  # (B, L, C)
    keep = (hist_items != NO_ITEM) & ~match.any(2)  # (B, L)
    kept = hist_items[keep]  # (K,)
    hist_rows = model.item_out.detach().index_select(0, kept).requires_grad_()  # (K, H)
    hist_bias = model.item_bias.detach().index_select(0, kept).requires_grad_()

    out, hidden = model.step(x, hidden, train=True, bf16=trainer.bf16, kernels=trainer.kernels)
    ages = torch.arange(window, device=out.device, dtype=torch.float32)
    weights = torch.sigmoid(readout.decay_logit) ** ages  # (L,)
    gate = readout.gate(out).unsqueeze(1)  # (B, 1)
    recency = torch.einsum("blc,l->bc", match.to(weights.dtype), weights)  # (B, C)
    scores = linear(out, item_rows, bias_rows, trainer.bf16).index_select(1, out_inv)
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

    opt = trainer.optimizer
    dense = model.dense_parameters()
    opt.dense_all(
        [f"dense{i}" for i in range(len(dense))],
        dense,
        [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense],
    )
    for p in dense:
        p.grad = None
    # A history row may also be an output row: one update per row, with the summed gradient.
    rows_all, row_inv = torch.unique(torch.cat((out_rows, kept)), return_inverse=True)
    grad_out = torch.zeros(len(rows_all), item_rows.shape[1], device=out.device)
    grad_out.index_add_(0, row_inv, torch.cat((item_rows.grad, hist_rows.grad)))  # type: ignore[arg-type]
    grad_bias = torch.zeros(len(rows_all), device=out.device)
    grad_bias.index_add_(0, row_inv, torch.cat((bias_rows.grad, hist_bias.grad)))  # type: ignore[arg-type]
    opt.rows("item_out", model.item_out, rows_all, grad_out)
    opt.rows("item_bias", model.item_bias, rows_all, grad_bias)
    if in_rows is not None and in_table is not None:
        opt.rows("item_in", model.item_in, in_rows, in_table.grad)  # type: ignore[arg-type]
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
