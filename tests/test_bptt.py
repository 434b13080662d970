"""Truncated BPTT (``train.bptt``): the window's gradient is autograd's through the explicitly
unrolled steps, a reset cuts it, k = 1 is GRU4Rec, and training with a window measures the
gradient norm by lag."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig
from recsys.data.batching import session_arrays
from recsys.model.gru4rec import GRU4Rec
from recsys.training.bptt import LAG_METRIC, BpttWindow
from recsys.training.leaves import step_rows
from recsys.training.trainer import Trainer, item_support, train_gru4rec
from tests.helpers import deterministic_log, small_train_config

N_ITEMS, B, H = 20, 4, 6
# Five steps (0 .. 4) of four slots: slot 1 starts a new session at step 2 (mid-window), and
# at step 3 slot 2 ends and the batch shrinks to slots 0, 1, 3.
KEEPS: list[np.ndarray | None] = [None, None, None, np.array([0, 1, 3]), None]
RESETS = [np.ones(B, bool), np.zeros(B, bool), np.array([0, 1, 0, 0], bool)]
RESETS += [np.zeros(3, bool), np.zeros(3, bool)]


def _cells() -> list[str]:
    """Every cell the config allows (just the GRU where ``model.cell`` does not exist yet)."""
    field = ModelConfig.model_fields.get("cell")
    return list(typing.get_args(field.annotation)) if field is not None else ["gru"]


def _sequence(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N_ITEMS, (len(r),), generator=gen) for r in RESETS]


def _unrolled(
    model: GRU4Rec, inputs: list[torch.Tensor], start: list[torch.Tensor], first: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps ``first`` .. last by a plain loop of the model's step from ``start`` with the
    resets and keeps written out, against a full copy of the item matrix: (output, table)."""
    table = model.item_out.detach().clone().requires_grad_()
    hidden = [h.detach() for h in start]
    out = hidden[-1]
    for t in range(first, len(inputs)):
        if t > first:
            if KEEPS[t] is not None:
                hidden = [h[torch.from_numpy(KEEPS[t])] for h in hidden]
            mask = torch.from_numpy(~RESETS[t]).float().unsqueeze(1)
            hidden = [h * mask for h in hidden]
        out, hidden = model.step(table[inputs[t]], hidden, train=False)
    return out, table


@pytest.mark.parametrize("cell", _cells())
@pytest.mark.parametrize("k", [3, 5])
def test_window_gradients_equal_autograd_through_the_unrolled_steps(cell: str, k: int) -> None:
    extra = {"cell": cell} if cell != "gru" else {}
    model = GRU4Rec(N_ITEMS, ModelConfig(layers=[H, H], **extra), seed=1)
    inputs = _sequence()
    window = BpttWindow(k, torch.device("cpu"))
    hidden = model.init_hidden(B)
    entering = []
    for t, x_t in enumerate(inputs):
        if KEEPS[t] is not None:
            hidden = [h[torch.from_numpy(KEEPS[t])] for h in hidden]
        hidden = [h * torch.from_numpy(~RESETS[t]).float().unsqueeze(1) for h in hidden]
        entering.append(hidden)
        window.push(x_t, KEEPS[t], RESETS[t], hidden)
        leaves = step_rows(model, window.inputs(), torch.arange(N_ITEMS))
        out, hidden = window.forward(leaves.x, lambda x, h: model.step(x, h, train=False))
        hidden = [h.detach() for h in hidden]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward(retain_graph=True)

    first = max(0, len(inputs) - k)
    ref_out, table = _unrolled(model, inputs, entering[first], first)
    dense = model.dense_parameters()
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), [*dense, table], allow_unused=True)
    torch.testing.assert_close(out, ref_out)
    for p, g in zip(dense, ref_grads[:-1], strict=True):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(p.grad if p.grad is not None else zero, zero if g is None else g)
    rows = torch.zeros_like(table)
    rows[leaves.out_rows] = leaves.item_rows.grad
    torch.testing.assert_close(rows, ref_grads[-1])

    # slot 1's loss alone reaches its new session's items (steps 2 .. 4), never the old one's
    leaves.item_rows.grad = None
    (out[1] * weight[1]).sum().backward()
    touched = set(torch.nonzero(leaves.item_rows.grad.abs().sum(1)).view(-1).tolist())
    assert {int(leaves.out_rows[r]) for r in touched} <= {int(inputs[t][1]) for t in (2, 3, 4)}
    assert int(inputs[4][1]) in {int(leaves.out_rows[r]) for r in touched}


def test_a_one_step_window_trains_the_same_weights_as_gru4rec() -> None:
    """k = 1 through the window's code (push, replayed random state, forward) is the plain
    step, bit for bit, dropouts on."""
    log = deterministic_log(n_sessions=200)
    data = session_arrays(log)
    mcfg = ModelConfig(layers=[16], dropout_embed=0.2, dropout_hidden=0.3)
    weights = []
    for windowed in (False, True):
        torch.manual_seed(0)
        cfg = small_train_config(seed=0)
        trainer = Trainer(
            GRU4Rec(30, mcfg, seed=0), cfg, item_support(log, 30), torch.device("cpu")
        )
        if windowed:
            trainer.window = BpttWindow(1, torch.device("cpu"))
        trainer.run_epoch(data, 0)
        weights.append(trainer.model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


@pytest.mark.parametrize("cell", _cells())
def test_training_with_a_window_logs_the_gradient_norm_at_every_lag(cell: str) -> None:
    log = deterministic_log(n_sessions=300)
    extra = {"cell": cell} if cell != "gru" else {}
    model_cfg = ModelConfig(layers=[16], dropout_hidden=0.2, **extra)
    result = train_gru4rec(log, 30, model_cfg, small_train_config(bptt=4, epochs=2))
    for record in result.history:
        norms = [record[LAG_METRIC.format(j)] for j in range(4)]
        assert norms[0] > 0 and all(np.isfinite(norms))
        if cell == "ffn":  # no memory: the loss never reaches an earlier state
            assert norms[1:] == [0.0, 0.0, 0.0]
        else:
            assert all(n > 0 for n in norms[1:])


@pytest.mark.parametrize(
    ("loss", "embedding"),
    [("cross-entropy", "separate"), ("bpr-max", "none"), ("top1-max", "shared")],
)
def test_a_window_trains_with_every_loss_and_input_mode(loss: str, embedding: str) -> None:
    log = deterministic_log(n_sessions=200)
    model_cfg = ModelConfig(layers=[16], embedding=embedding, dropout_embed=0.1)
    cfg = small_train_config(bptt=3, loss=loss, max_steps=30)
    (record,) = train_gru4rec(log, 30, model_cfg, cfg).history
    assert np.isfinite(record["loss"]) and record["steps"] == 30
    assert record[LAG_METRIC.format(2)] > 0
