"""The item rows one training step reads, as leaf tensors that collect their gradients.

Only these rows of the item matrices change in a step (row-sparse Adagrad), so a step gathers
them once, scores against them, and hands their gradients to the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.model.gru4rec import GRU4Rec
from recsys.model.optimizer import RowAdagradM


@dataclass
class StepRows:
    x: torch.Tensor  # (B, D_in) the slots' input rows
    item_rows: torch.Tensor  # (U, H) distinct output rows (leaf)
    bias_rows: torch.Tensor  # (U,) their biases (leaf)
    out_rows: torch.Tensor  # (U,) their item indices
    out_inv: torch.Tensor  # (C,) column c scores distinct row out_inv[c]
    in_rows: torch.Tensor | None  # separate / one-hot input rows' item indices
    in_table: torch.Tensor | None  # (V, D_in) their input vectors (leaf)


def step_rows(model: GRU4Rec, inputs: torch.Tensor, out_idx: torch.Tensor) -> StepRows:
    """Leaves for a step whose slots read ``inputs`` (B,) and score the items ``out_idx`` (C,)."""
    b = len(inputs)
    in_rows = in_table = None
    if model.mode == "shared":
        rows, inv = torch.unique(torch.cat((inputs, out_idx)), return_inverse=True)
        item_rows = model.item_out.detach().index_select(0, rows).requires_grad_()  # (U, H)
        x = item_rows.index_select(0, inv[:b])  # (B, H)
        out_rows, out_inv = rows, inv[b:]
    else:
        out_rows, out_inv = torch.unique(out_idx, return_inverse=True)
        item_rows = model.item_out.detach().index_select(0, out_rows).requires_grad_()
        in_rows, in_inv = torch.unique(inputs, return_inverse=True)
        in_table = model.item_in.detach().index_select(0, in_rows).requires_grad_()  # type: ignore[union-attr]
        x = in_table.index_select(0, in_inv)
    bias_rows = model.item_bias.detach().index_select(0, out_rows).requires_grad_()
    return StepRows(x, item_rows, bias_rows, out_rows, out_inv, in_rows, in_table)


def apply_updates(opt: RowAdagradM, model: GRU4Rec, leaves: StepRows) -> None:
    """After ``backward``: dense Adagrad on the network's weights (and the repeat readout's),
    row-sparse on the item rows the step read.

    The optimiser updates the parameters themselves (under no_grad), not their ``.data``:
    in-place changes through ``.data`` do not bump a tensor's version, and caches keyed on it
    (the catalogue ranker's low-precision copies) would go stale between epochs.
    """
    dense = model.dense_parameters()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    opt.dense_all([f"dense{i}" for i in range(len(dense))], dense, grads)
    for p in dense:
        p.grad = None
    out_grad, bias_grad = leaves.item_rows.grad, leaves.bias_rows.grad
    assert out_grad is not None and bias_grad is not None
    opt.rows("item_out", model.item_out, leaves.out_rows, out_grad)
    opt.rows("item_bias", model.item_bias, leaves.out_rows, bias_grad)
    if leaves.in_rows is not None and leaves.in_table is not None:
        opt.rows("item_in", model.item_in, leaves.in_rows, leaves.in_table.grad)  # type: ignore[arg-type]
