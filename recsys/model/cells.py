"""The recurrent cells other than the GRU (``model.cell``): LSTM, Elman RNN and a memory-less
control, so that what memory buys can be measured in the same network and harness.

Each cell works from its input gates with the bias included (``gi``, (B, G·H): what layer 0's
``input_gates`` looks up or projects once per click), reads the recurrent weights in one
(G·H, H) product like the GRU does, and keeps one state tensor per layer:

- ``lstm``: gates (i, f, g, o) as ``torch.nn.LSTMCell`` orders them; the state is ``[c, h]``
  side by side (B, 2H), so every caller that keeps, resets (a multiply), slices or stores a
  layer's state handles it as one tensor, and the trailing H columns are the output as for
  every other cell;
- ``rnn``: ``tanh(gi + W_hh h + b_hh)``, the Elman cell of ``torch.nn.RNNCell``;
- ``ffn``: ``tanh(gi)``: the next item from the current item alone (the GRU4Rec authors'
  sanity check); its state is its last output, which it never reads (no recurrent weights).

The GRU itself stays in ``recsys.model.gru4rec`` with its native kernels.
"""

from __future__ import annotations

import torch

from recsys.model.matmul import linear

GATES = {"gru": 3, "lstm": 4, "rnn": 1, "ffn": 1}  # input-gate blocks per layer


def state_width(cell: str, units: int) -> int:
    """Width of one layer's kept state: the LSTM keeps its memory cell beside its output."""
    return 2 * units if cell == "lstm" else units


def recurrent(cell: str) -> bool:
    """Whether the cell reads its previous state (and so has recurrent weights)."""
    return cell != "ffn"


def output_part(cell: str, state: torch.Tensor, units: int) -> torch.Tensor:
    """A layer's output (what the next layer and the scorer read) from its state."""
    return state[..., units:] if cell == "lstm" else state


def with_output(cell: str, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The state with its output replaced (dropout: the next step sees what the scorer saw)."""
    if cell == "lstm":
        return torch.cat((state[..., : out.shape[-1]], out), -1)
    return out


def cell_from_gates(
    cell: str,
    gi: torch.Tensor,
    state: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor,
    bf16: bool = False,
) -> torch.Tensor:
    """One step of ``cell`` (not ``gru``) from its input gates: the layer's new state."""
    if cell == "ffn":
        return torch.tanh(gi)
    if cell == "rnn":
        return torch.tanh(gi + linear(state, w_hh, b_hh, bf16))
    if cell != "lstm":
        raise ValueError(f"unknown cell {cell!r}")
    units = w_hh.shape[-1]
    c, h = state[..., :units], state[..., units:]
    gates = gi + linear(h, w_hh, b_hh, bf16)  # (B, 4H): one product for the four gates
    i, f, g, o = gates.chunk(4, -1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.cat((c_new, torch.sigmoid(o) * torch.tanh(c_new)), -1)
