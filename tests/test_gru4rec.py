"""GRU4Rec's parts against hand computations: losses, optimiser, sampler, embedding modes, files."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.model.gru4rec import GRU4Rec, inverted_dropout
from recsys.model.losses import bpr_max, cross_entropy, top1_max
from recsys.model.matmul import bf16_is_native, linear, use_bf16
from recsys.model.optimizer import RowAdagradM
from recsys.model.sampling import SampleStore
from recsys.training.trainer import Trainer

SCORES = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])  # B=2 rows, 2 in-batch + 1 sample


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cross_entropy_by_hand() -> None:
    expected = 0.0
    for i, row in enumerate(SCORES.tolist()):
        expected -= row[i] - math.log(sum(math.exp(v) for v in row))
    assert float(cross_entropy(SCORES)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_logq_shifts_every_column() -> None:
    shift = torch.tensor([0.3, -0.2, 1.0])
    expected = 0.0
    for i, row in enumerate(SCORES.tolist()):
        shifted = [v - s for v, s in zip(row, shift.tolist(), strict=True)]
        expected -= shifted[i] - math.log(sum(math.exp(v) for v in shifted))
    assert float(cross_entropy(SCORES, shift)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("skipped", [[1], [0, 3], [0, 1, 2, 3], []])
def test_skipped_slots_give_the_cross_entropy_of_the_matrix_without_them(
    with_shift: bool, skipped: list[int]
) -> None:
    """Masking the held-out slots (rows and their in-batch columns) is the loss of the smaller
    matrix, in value and in gradient; with every slot skipped it is 0 and teaches nothing."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 3
    shift = torch.randn(9, generator=gen, dtype=torch.float64) if with_shift else None
    skip = torch.zeros(4, dtype=torch.bool)
    skip[skipped] = True
    kept = torch.nonzero(~skip).squeeze(1)
    cols = torch.cat((kept, torch.arange(4, 9)))
    masked_in, sub_in = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    masked = cross_entropy(masked_in, shift, skip)
    sub = cross_entropy(sub_in[kept][:, cols], None if shift is None else shift[cols])
    torch.testing.assert_close(masked, sub)
    masked.backward()
    sub.backward()
    torch.testing.assert_close(masked_in.grad, sub_in.grad)
    assert torch.isfinite(masked_in.grad).all()  # type: ignore[union-attr]


@pytest.mark.parametrize("elu", [0.0, 1.0])
def test_bpr_max_by_hand(elu: float) -> None:
    bpreg = 0.7
    expected = 0.0
    for i, raw in enumerate(SCORES.tolist()):
        row = [v if (elu == 0 or v > 0) else elu * (math.exp(v) - 1) for v in raw]
        negs = [j for j in range(len(row)) if j != i]
        z = sum(math.exp(row[j]) for j in negs)
        s = {j: math.exp(row[j]) / z for j in negs}
        ranking = sum(s[j] * _sigmoid(row[i] - row[j]) for j in negs)
        expected += -math.log(ranking) + bpreg * sum(s[j] * row[j] ** 2 for j in negs)
    assert float(bpr_max(SCORES, bpreg, elu)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("elu", [0.0, 1.0])
def test_bpr_max_gradient_matches_finite_differences(elu: float) -> None:
    """The hand-written backward of BPR-max (positive column, negatives, ELU) is the gradient."""
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(4, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bpr_max(x, 0.9, elu), (scores,))


@pytest.mark.parametrize("with_grad", [True, False])
def test_bf16_linear_is_the_fp32_product_to_bf16_precision(with_grad: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=gen).requires_grad_(with_grad)
    w = torch.randn(9, 40, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    weights = torch.randn(6, 9, generator=gen)
    grads = {}
    for bf16 in (False, True):
        y = linear(x, w, bias, bf16=bf16)
        assert y.dtype == torch.float32
        inputs = [t for t in (x, w, bias) if t.requires_grad]
        grads[bf16] = (y, *torch.autograd.grad((y * weights).sum(), inputs))
    assert not torch.equal(grads[False][0], grads[True][0])  # the bf16 path was taken
    for exact, rounded in zip(grads[False], grads[True], strict=True):
        assert rounded.dtype == torch.float32
        # bf16 operands: 8 significant bits, so a few parts in a thousand of the magnitude
        scale = float(exact.detach().abs().max())
        assert torch.allclose(exact, rounded, rtol=0, atol=2e-2 * scale)


def test_matmul_setting_resolves_to_bf16_only_where_it_is_faster() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert use_bf16("bf16", cpu) and use_bf16("bf16", gpu)
    assert not use_bf16("fp32", cpu) and not use_bf16("fp32", gpu)
    assert use_bf16("auto", cpu) == bf16_is_native()
    assert not use_bf16("auto", gpu)  # a GPU step is bound by kernel launches, not products


def test_dropout_keeps_each_unit_with_probability_one_minus_p() -> None:
    torch.manual_seed(0)
    x = torch.full((400, 500), 3.0, requires_grad=True)
    y = inverted_dropout(x, 0.3)
    kept = y != 0
    n = kept.numel()
    assert abs(float(kept.float().mean()) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    assert torch.allclose(y[kept], torch.tensor(3.0 / 0.7))  # inverted: scaled at train time
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad != 0, kept)


def test_top1_max_by_hand() -> None:
    expected = 0.0
    for i, row in enumerate(SCORES.tolist()):
        negs = [j for j in range(len(row)) if j != i]
        z = sum(math.exp(row[j]) for j in negs)
        for j in negs:
            s = math.exp(row[j]) / z
            expected += s * (_sigmoid(row[j] - row[i]) + _sigmoid(row[j] ** 2))
    assert float(top1_max(SCORES)) == pytest.approx(expected, rel=1e-6)


def test_row_adagrad_momentum_by_hand() -> None:
    opt = RowAdagradM(learning_rate=0.1, momentum=0.5, eps=1e-6)
    param = torch.arange(12, dtype=torch.float32).view(4, 3)
    before = param.clone()
    rows = torch.tensor([2, 0])
    g1 = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.0, 3.0]])
    opt.rows("w", param, rows, g1)
    # acc = g², v = -lr g / sqrt(acc + eps), p += v
    acc1 = g1**2
    v1 = -0.1 * g1 / torch.sqrt(acc1 + 1e-6)
    assert torch.allclose(param[rows], before[rows] + v1)
    assert torch.equal(param[[1, 3]], before[[1, 3]])  # untouched rows stay as they were
    g2 = torch.tensor([[0.5, 0.5, 0.5]])
    opt.rows("w", param, torch.tensor([2]), g2)
    acc2 = acc1[0] + g2[0] ** 2
    v2 = 0.5 * v1[0] - 0.1 * g2[0] / torch.sqrt(acc2 + 1e-6)
    assert torch.allclose(param[2], before[2] + v1[0] + v2)
    assert torch.allclose(
        param[0], before[0] + v1[1]
    )  # row 0 not used in step 2: no momentum drift


def test_dense_adagrad_without_momentum() -> None:
    opt = RowAdagradM(learning_rate=0.5)
    p = torch.ones(3)
    g = torch.tensor([1.0, 2.0, -4.0])
    opt.dense("p", p, g)
    assert torch.allclose(p, 1 - 0.5 * g / torch.sqrt(g**2 + 1e-6))


def test_sampler_follows_popularity_power_alpha() -> None:
    support = torch.tensor([1000.0, 300.0, 100.0, 30.0, 10.0, 1.0])
    alpha = 0.5
    store = SampleStore(support, 1000, alpha, 200_000, torch.Generator().manual_seed(7))
    draws = torch.cat([store.draw() for _ in range(400)])  # 400k samples, with refills
    counts = torch.bincount(draws, minlength=6).double()
    expected = support.double() ** alpha
    expected = expected / expected.sum() * len(draws)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_sampler_state_continues_the_same_sequence() -> None:
    support = torch.arange(1, 50, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    a = SampleStore(support, 8, 0.7, 64, gen)
    first = [a.draw() for _ in range(5)]
    state, rng = a.state(), gen.get_state()
    assert state["next"] == len(first) < a.rows  # saved mid-store: its unused rows carry over
    rest = [a.draw() for _ in range(20)]  # the store's last 3 rows, then two refills
    gen2 = torch.Generator()
    gen2.set_state(rng)
    b = SampleStore(support, 8, 0.7, 64, gen2)
    b.load_state(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.draw() for _ in range(20)], strict=True))
    gen3 = torch.Generator()
    gen3.set_state(rng)
    generator_only = SampleStore(support, 8, 0.7, 64, gen3)
    assert not torch.equal(generator_only.draw(), rest[0])  # the state, not the rng, continues


def test_shared_embedding_ties_input_and_output_vectors() -> None:
    model = GRU4Rec(20, ModelConfig(layers=[8], embedding="shared"))
    assert model.input_table() is model.item_out
    trainer = Trainer(
        model, TrainConfig(n_sample=4, sample_store_size=40), torch.ones(20), torch.device("cpu")
    )
    before = model.item_out.detach().clone()
    inputs = torch.tensor([3, 4])
    targets = torch.tensor([5, 6])
    trainer.train_step(inputs, targets, model.init_hidden(2))
    changed = (model.item_out.detach() != before).any(1)
    assert changed[3] and changed[4]  # rows used only as inputs were updated too: one matrix


@pytest.mark.parametrize("embedding", ["shared", "separate", "none"])
def test_a_step_changes_only_the_rows_it_used(embedding: str) -> None:
    n = 200
    model = GRU4Rec(n, ModelConfig(layers=[6, 5], embedding=embedding, embedding_dim=7))
    cfg = TrainConfig(n_sample=3, sample_store_size=30, momentum=0.3)
    trainer = Trainer(model, cfg, torch.ones(n), torch.device("cpu"))
    tables = {"out": model.item_out, "bias": model.item_bias}
    if model.item_in is not None:
        tables["in"] = model.item_in
    before = {k: v.detach().clone() for k, v in tables.items()}
    gru_before = [p.detach().clone() for p in model.dense_parameters()]
    inputs, targets = torch.tensor([1, 2]), torch.tensor([10, 11])
    hidden = [
        torch.rand(2, h) for h in model.layers
    ]  # mid-session state: every GRU weight gets a gradient
    trainer.train_step(inputs, targets, hidden)
    sampler = trainer.sampler.state()
    store, handed_out = sampler["store"], int(sampler["next"])
    assert isinstance(store, torch.Tensor) and handed_out == 1  # a step draws one row
    drawn = set(store[0].tolist())
    used_out = {10, 11} | drawn
    used_in = {1, 2}
    for name, table in tables.items():
        diff = (table.detach() != before[name]).reshape(n, -1).any(1)
        changed = set(torch.nonzero(diff).flatten().tolist())
        allowed = (
            used_in | used_out
            if embedding == "shared" and name == "out"
            else (used_in if name == "in" else used_out)
        )
        assert changed <= allowed, name
        assert changed, name
    assert all(
        not torch.equal(a, p.detach())
        for a, p in zip(gru_before, model.dense_parameters(), strict=True)
    )


@pytest.mark.parametrize("embedding", ["shared", "separate", "none"])
def test_multilayer_shapes_and_uniform_init(embedding: str) -> None:
    model = GRU4Rec(100, ModelConfig(layers=[16, 8], embedding=embedding, embedding_dim=12))
    out, hidden = model.step(
        model.input_table()[torch.tensor([1, 2, 3])], model.init_hidden(3), train=False
    )
    assert out.shape == (3, 8)
    assert [h.shape for h in hidden] == [(3, 16), (3, 8)]
    bound = math.sqrt(6 / (16 + 16))
    assert float(model.w_hh[0].detach().abs().max()) <= bound
    assert float(model.item_bias.detach().abs().max()) == 0.0


def _plain_step(model: GRU4Rec, items: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Layer 0's click step from the weights as they are now, without any cached copy."""
    gi = torch.addmm(model.b_ih[0], model.input_table()[items], model.w_ih[0].t())
    gh = torch.addmm(model.b_hh[0], h, model.w_hh[0].t())
    r, z = torch.sigmoid(gi[:, :16] + gh[:, :16]).chunk(2, -1)
    n = torch.tanh(gi[:, 16:] + r * gh[:, 16:])
    return n + z * (h - n)


def test_a_click_step_follows_its_weights_through_every_kind_of_change() -> None:
    """A click's products read a cached transposed copy of layer 0's weights: an in-place update,
    a replaced ``.data`` and a dtype change must each be seen (the last two keep the version)."""
    model = GRU4Rec(30, ModelConfig(layers=[8], embedding="shared"))
    items, h = torch.tensor([3]), torch.zeros(1, 8)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model.infer_step(model.input_gates(items), [h.to(model.w_hh[0].dtype)])[0]

    torch.testing.assert_close(step(), _plain_step(model, items, h))
    with torch.no_grad():
        model.w_hh[0].mul_(0.5)  # in place: the version moves
    torch.testing.assert_close(step(), _plain_step(model, items, h))
    model.w_ih[0].data = torch.randn_like(model.w_ih[0])  # same object, same version
    torch.testing.assert_close(step(), _plain_step(model, items, h))
    model.double()  # new storage of another dtype, same objects
    expected = _plain_step(model, items, h.double())
    torch.testing.assert_close(step(), expected)
