"""GRU4Rec: the network (Hidasi et al. ICLR 2016; Hidasi & Karatzoglou CIKM 2018).

One file holds the network and its three item-input modes (the file format: recsys.model.artifact):
- ``shared``: the input vector of an item is its output vector (one matrix, tied);
- ``separate``: an input embedding of its own;
- ``none``: one-hot input, i.e. the first GRU layer's input weights are a per-item row lookup.
``model.cell`` swaps the GRU for an LSTM, an Elman RNN or a memory-less layer
(``recsys.model.cells``); the GRU keeps its draws and native kernels. Scores are
``h · Wy[items]ᵀ + by[items]``. The item matrices are plain tensors updated row by
row by the trainer (only the rows used in a step change); the GRU weights are dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import ModelConfig
from recsys.core.errors import RecsysError
from recsys.core.fingerprint import tensor_key
from recsys.model.cells import GATES, cell_from_gates, output_part, recurrent, state_width
from recsys.model.cells import with_output as _with_output
from recsys.model.matmul import linear
from recsys.model.readout import RepeatReadout, recent_items

FEW_ROWS = 8  # inference products of up to this many rows read a transposed copy of the weights


def _draw(shape: tuple[int, int], fan_in: int, fan_out: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform ±sqrt(6/(fan_in+fan_out)); callers draw one block per gate."""
    scale = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=gen) * 2 - 1) * scale


def _unset(shape: tuple[int, int], fan_in: int, fan_out: int, gen: torch.Generator) -> torch.Tensor:
    """Storage without values, for a network whose weights are loaded next."""
    return torch.empty(shape)


class GRU4Rec(nn.Module):
    """Session-parallel GRU over item sequences, scoring the whole catalogue or a subset."""

    def __init__(
        self, n_items: int, config: ModelConfig, seed: int = 42, init: bool = True
    ) -> None:
        """``init=False`` skips the random draws (a quarter of a second for 43k items, on the
        live service's roll-over path) when a state dict overwrites every weight next."""
        super().__init__()
        if n_items < 1:
            raise RecsysError("GRU4Rec needs at least one item")
        self.n_items = n_items
        self.config = config
        self.layers = list(config.layers)
        self.mode = config.embedding
        self.cell = config.cell
        self.state_sizes = [state_width(self.cell, h) for h in self.layers]  # per layer
        gates = GATES[self.cell]  # input-gate blocks; the GRU's draws are the published model's
        gen = torch.Generator().manual_seed(seed)
        draw = _draw if init else _unset
        out_dim = self.layers[-1]

        # Item output vectors and biases: (n_items, H_last), (n_items,)
        self.item_out = nn.Parameter(draw((n_items, out_dim), n_items, out_dim, gen))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        if self.mode == "separate":
            dim = config.embedding_dim or self.layers[0]
            self.item_in = nn.Parameter(draw((n_items, dim), n_items, dim, gen))
            in_dim = dim
        elif self.mode == "none":
            h0 = self.layers[0]
            # One-hot input: per-item rows of the first layer's input weights, one block per gate.
            self.item_in = nn.Parameter(
                torch.cat([draw((n_items, h0), n_items, h0, gen) for _ in range(gates)], 1)
            )
            in_dim = 0
        else:
            self.register_parameter("item_in", None)
            in_dim = out_dim

        self.w_ih = nn.ParameterList()
        self.w_hh = nn.ParameterList()
        self.b_ih = nn.ParameterList()
        self.b_hh = nn.ParameterList()
        for k, h in enumerate(self.layers):
            fan_in = in_dim if k == 0 else self.layers[k - 1]
            if k == 0 and self.mode == "none":
                self.w_ih.append(nn.Parameter(torch.empty(0)))  # lives in item_in
            else:
                self.w_ih.append(
                    nn.Parameter(
                        torch.cat([draw((h, fan_in), fan_in, h, gen) for _ in range(gates)])
                    )
                )  # (G·H, fan_in)
            hh = gates if recurrent(self.cell) else 0  # ffn: no recurrent weights
            self.w_hh.append(
                nn.Parameter(torch.cat([draw((h, h), h, h, gen) for _ in range(hh)]))
                if hh
                else nn.Parameter(torch.empty(0))
            )  # (G·H, H)
            self.b_ih.append(nn.Parameter(torch.zeros(gates * h)))
            self.b_hh.append(nn.Parameter(torch.zeros(hh * h)))
        # Created last and without random draws: readout off is the published model, weight
        # for weight (same seed, same state dict).
        self.readout = (
            RepeatReadout(out_dim, config.repeat_window) if config.readout == "repeat" else None
        )

    # --- the recurrent step -----------------------------------------------------------------

    def input_table(self) -> torch.Tensor:
        """The matrix whose rows are the items' inputs (shared mode: the output matrix)."""
        return self.item_out if self.item_in is None else self.item_in

    def dense_parameters(self) -> list[nn.Parameter]:
        """GRU (and readout) weights: updated densely. Item matrices are excluded (row-sparse)."""
        dense = [
            p for group in (self.w_ih, self.w_hh, self.b_ih, self.b_hh) for p in group if p.numel()
        ]
        return dense + (list(self.readout.parameters()) if self.readout is not None else [])

    def init_hidden(self, batch: int) -> list[torch.Tensor]:
        device = self.item_out.device
        return [torch.zeros(batch, s, device=device) for s in self.state_sizes]

    def step(
        self,
        x: torch.Tensor,
        hidden: list[torch.Tensor],
        train: bool,
        bf16: bool = False,
        kernels: ModuleType | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One click for every slot: x (B, D_in) input rows -> output (B, H_last), new hidden.

        With dropout on the hidden output, the dropped-out vector is also the next hidden state
        (as in the original), so the next step sees what the scorer saw. ``bf16``: the gate
        products take bf16 operands (``recsys.model.matmul``); the cell arithmetic stays fp32.
        ``kernels`` (``recsys.model.kernels``): the cell's element-wise work and the dropout
        masks from the native kernels.
        """
        cfg = self.config
        new_hidden: list[torch.Tensor] = []
        if self.mode != "none" and train and cfg.dropout_embed > 0:
            x = inverted_dropout(x, cfg.dropout_embed, kernels)
        for k, h in enumerate(hidden):
            if self.cell != "gru":
                onehot = k == 0 and self.mode == "none"
                gi = x + self.b_ih[k] if onehot else linear(x, self.w_ih[k], self.b_ih[k], bf16)
                state = cell_from_gates(self.cell, gi, h, self.w_hh[k], self.b_hh[k], bf16)
                p = cfg.dropout_embed if onehot else cfg.dropout_hidden
                out = output_part(self.cell, state, self.layers[k])
                if train and p > 0:
                    out = inverted_dropout(out, p, kernels)
                    state = _with_output(self.cell, state, out)
                new_hidden.append(state)
                x = out
                continue
            if k == 0 and self.mode == "none":
                h_new = self._onehot_cell(x, h, k, bf16, kernels)
                p = cfg.dropout_embed
            elif bf16 or kernels is not None:
                gi = linear(x, self.w_ih[k], self.b_ih[k], bf16)
                h_new = gru_cell_from_gates(gi, h, self.w_hh[k], self.b_hh[k], bf16, kernels)
                p = cfg.dropout_hidden
            else:
                h_new = torch.gru_cell(x, h, self.w_ih[k], self.w_hh[k], self.b_ih[k], self.b_hh[k])
                p = cfg.dropout_hidden
            if train and p > 0:
                h_new = inverted_dropout(h_new, p, kernels)
            new_hidden.append(h_new)
            x = h_new
        return x, new_hidden

    def _onehot_cell(
        self,
        gi: torch.Tensor,
        h: torch.Tensor,
        k: int,
        bf16: bool = False,
        kernels: ModuleType | None = None,
    ) -> torch.Tensor:
        """GRU cell whose input projection was looked up per item: gi (B, 3H)."""
        return gru_cell_from_gates(gi + self.b_ih[k], h, self.w_hh[k], self.b_hh[k], bf16, kernels)

    # --- inference --------------------------------------------------------------------------

    def input_gates(self, items: torch.Tensor) -> torch.Tensor:
        """Layer 0's input projection, bias included, for item indices of any shape: (..., 3H).

        Inference computes it for a whole session in one product, so that each click then only
        reads the recurrent weights (a click's cost on a CPU is reading weight matrices).
        """
        if self.mode == "none":
            return self.item_in[items] + self.b_ih[0]
        table = self.input_table()[items]
        flat = table.reshape(-1, table.shape[-1])
        flat = torch.addmm(self.b_ih[0], flat, self._transposed(0, flat.shape[0]))
        return flat.view(*table.shape[:-1], -1)

    def _transposed(self, which: int, rows: int) -> torch.Tensor:
        """Layer 0's input (0) or recurrent (1) weights transposed, for an inference product of
        ``rows`` rows. Up to FEW_ROWS (a live click) a contiguous copy, which a one-row product
        reads about twice as fast (0.27 against 0.58 ms for both at 512 units, the weights out
        of cache); for more rows the plain view, faster there (19 against 23 ms for 1,024).
        The copy is rebuilt when training changes the weights; a plain tensor (not an inference
        tensor), without gradients. Exporters trace the view (a cache is state they cannot
        follow)."""
        w = (self.w_ih, self.w_hh)[which][0]
        # a symbolic row count (an exporter's): no comparison, which would fix the batch size
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing or w.is_inference() or not isinstance(rows, int) or rows > FEW_ROWS:
            return w.t()  # (an inference tensor has no version to key a copy on)
        key = tensor_key(w)
        cache = self.__dict__.setdefault("_inference_copies", {})
        if cache.get(which, (None,))[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cache[which] = (key, w.detach().t().contiguous())
        return cache[which][1]  # type: ignore[no-any-return]

    def infer_step(
        self, gates: torch.Tensor, hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One click at inference from layer 0's input gates (B, G·H): output (B, H_last), hidden."""
        if self.cell != "gru":
            new_hidden, out = [], gates
            for k, state in enumerate(hidden):
                gi = F.linear(out, self.w_ih[k], self.b_ih[k]) if k else gates
                new = cell_from_gates(self.cell, gi, state, self.w_hh[k], self.b_hh[k])
                out = output_part(self.cell, new, self.layers[k])
                new_hidden.append(new)
            return out, new_hidden
        h0 = hidden[0]
        gh = torch.addmm(self.b_hh[0], h0, self._transposed(1, h0.shape[0]))
        h = gru_from_products(gates, gh, h0)
        new_hidden = [h]
        for k in range(1, len(hidden)):
            h = torch.gru_cell(h, hidden[k], self.w_ih[k], self.w_hh[k], self.b_ih[k], self.b_hh[k])
            new_hidden.append(h)
        return h, new_hidden

    @torch.inference_mode()
    def encode_sessions(self, padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Outputs after every click of a batch of sessions, each starting from a zero state.

        padded (B, T) item indices (any value past a session's length), lengths (B,).
        Returns (B, T, H_last); rows past a session's length are meaningless.
        """
        b, t_max = padded.shape
        hidden = self.init_hidden(b)
        gates = self.input_gates(padded.clamp(0, self.n_items - 1))  # (B, T, 3H), one product
        outs = []
        for t in range(t_max):
            out, hidden = self.infer_step(gates[:, t], hidden)
            outs.append(out)
        return torch.stack(outs, 1)

    @torch.inference_mode()
    def prediction_outputs(self, padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Outputs after every proper prefix (positions t < len - 1), session-major: (N, H_last).

        Sessions are run longest first, so each step works on a shrinking prefix of the batch
        and no GRU step is spent on padding or on a session's last click (nothing follows it).
        """
        order = torch.argsort(lengths, descending=True, stable=True)
        steps = (lengths[order] - 1).tolist()  # predictions per session, descending
        items = padded[order]
        b = len(steps)
        t_max = max(steps, default=0)
        hidden = self.init_hidden(b)
        buf = torch.empty(b, t_max, self.layers[-1], device=padded.device)  # (B, T-1, H)
        active = b
        for t in range(t_max):
            while active and steps[active - 1] <= t:
                active -= 1
            hidden = [h[:active] for h in hidden]
            out, hidden = self.infer_step(self.input_gates(items[:active, t]), hidden)
            buf[:active, t] = out  # (active, H)
        buf = buf[torch.argsort(order)]  # back to the callers' session order
        mask = torch.arange(t_max, device=padded.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        return buf[mask]

    @torch.inference_mode()
    def last_outputs(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        """Output after the last click of each prefix (non-empty index arrays): (B, H_last)."""
        padded, lengths = pad_sessions(prefixes)
        device = self.item_out.device
        outs = self.encode_sessions(padded.to(device), lengths.to(device))  # (B, T, H)
        return outs[torch.arange(len(prefixes), device=device), (lengths - 1).to(device)]

    def session_outputs(self, sessions: Sequence[np.ndarray]) -> torch.Tensor:
        """Outputs after every proper prefix of every session, session-major: (N, H_last)."""
        padded, lengths = pad_sessions(sessions)
        device = self.item_out.device
        return self.prediction_outputs(padded.to(device), lengths.to(device))

    @torch.inference_mode()
    def prefix_boosts(
        self, out: torch.Tensor, prefixes: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The readout's bonus for each prefix's own items (what a ranking adds to the catalogue
        scores), for outputs ``out`` (M, H) after those prefixes; None without a readout."""
        if self.readout is None:
            return None
        history = recent_items(prefixes, self.readout.window).to(out.device)
        return self.readout.boost(out, history)


def pad_sessions(sessions: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) int64 item indices padded with 0, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sessions], dtype=torch.int64)
    padded = torch.zeros(len(sessions), int(lengths.max()), dtype=torch.int64)
    for i, s in enumerate(sessions):
        padded[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return padded, lengths


def inverted_dropout(x: torch.Tensor, p: float, kernels: ModuleType | None = None) -> torch.Tensor:
    """Inverted dropout. The mask comes from ``rand``, 3x faster on a CPU than the
    ``bernoulli_`` of ``F.dropout`` (0.25 vs 0.79 ms for 128 x 512, 6% of a (b) step); with
    ``kernels`` (CPU) from a counter-based hash seeded by torch's generator (0.02 ms)."""
    if kernels is not None:
        seed = int(torch.randint(0, 2**62, ()).item())
        return x * kernels.dropout_mask(x.numel(), p, seed).view_as(x)
    keep = (torch.rand_like(x) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep


def gru_cell_from_gates(
    gi: torch.Tensor,
    h: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor,
    bf16: bool = False,
    kernels: ModuleType | None = None,
) -> torch.Tensor:
    """A GRU cell from its input gates (bias included): the arithmetic of ``torch.gru_cell``;
    with ``kernels`` (a CPU training step) its element-wise part is one native pass."""
    gh = linear(h, w_hh, b_hh, bf16)  # (B, 3H)
    if kernels is not None:
        return _FusedGruCell.apply(gi, gh, h, kernels)  # type: ignore[no-any-return]
    return gru_from_products(gi, gh, h)


def gru_from_products(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A GRU cell's element-wise part from its input and recurrent gates (biases included)."""
    split = 2 * h.shape[-1]
    r, z = torch.sigmoid(gi[..., :split] + gh[..., :split]).chunk(2, -1)  # reset, update
    n = torch.tanh(gi[..., split:] + r * gh[..., split:])
    return n + z * (h - n)


class _FusedGruCell(torch.autograd.Function):
    """``gru_cell_from_gates``'s element-wise part from its gates by the native kernels, forward and backward:
    one pass each instead of ~10 ops and their autograd nodes (slices of (B, 3H) gates, whose
    gradients autograd spreads into zeroed buffers)."""

    @staticmethod
    def forward(
        ctx: Any, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, kernels: ModuleType
    ) -> torch.Tensor:
        gh = gh.contiguous()
        h = h.contiguous()
        out, act = kernels.gru_cell_forward(gi.contiguous(), gh, h)  # (B, H), (B, 3H)
        ctx.save_for_backward(act, gh, h)
        ctx.kernels = kernels
        return out  # type: ignore[no-any-return]

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        act, gh, h = ctx.saved_tensors
        d_gi, d_gh, d_h = ctx.kernels.gru_cell_backward(grad.contiguous(), act, gh, h)
        return d_gi, d_gh, d_h, None
