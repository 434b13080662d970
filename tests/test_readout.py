"""The repeat readout (model.readout: repeat): off is the published model, its gradient is the
analytic one, it trains with every loss, and every scoring path ranks with it alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig
from recsys.data.batching import session_arrays
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.model.readout import (
    GATE_INIT,
    NO_ITEM,
    RepeatReadout,
    distinct_history,
    push,
    recent_items,
)
from recsys.ranking import CatalogueRanker, rank_scores
from recsys.serving.recommender import SessionRecommender
from recsys.training.readout_loss import SampledPartition, ranking_readout_loss, readout_loss
from recsys.training.trainer import Trainer, item_support, train_gru4rec
from tests.helpers import deterministic_log, small_train_config


def test_readout_off_is_the_published_network_weight_for_weight() -> None:
    plain = GRU4Rec(50, ModelConfig(layers=[16, 8], embedding="separate"), seed=3)
    with_readout = GRU4Rec(
        50, ModelConfig(layers=[16, 8], embedding="separate", readout="repeat"), seed=3
    )
    assert plain.readout is None
    readout_keys = {k for k in with_readout.state_dict() if k.startswith("readout.")}
    assert readout_keys == {
        "readout.gate_w",
        "readout.gate_b",
        "readout.decay_logit",
        "readout.log_temperature",
    }
    for name, tensor in plain.state_dict().items():  # no random draw moved
        assert torch.equal(tensor, with_readout.state_dict()[name]), name
    assert len(with_readout.dense_parameters()) == len(plain.dense_parameters()) + 4


def test_the_bonus_and_its_gradient_against_finite_differences() -> None:
    readout = RepeatReadout(4, window=3).double()
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    history = torch.tensor([[5, 2, 5], [7, NO_ITEM, NO_ITEM]])
    items = torch.tensor([5, 2, 7, 9])

    def bonus(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        params = {"gate_w": w, "gate_b": b, "decay_logit": d}
        return torch.func.functional_call(readout, params, (out, history, items))

    params = [
        torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    # by hand: gate · log(1 + Σ λ^age), item 5 at ages 0 and 2, item 2 at age 1
    got = bonus(out, *params).detach()
    with torch.no_grad():
        lam = torch.sigmoid(params[2])[0]
        gate = torch.nn.functional.softplus(out @ params[0] + params[1])
    torch.testing.assert_close(got[0, 0], gate[0] * torch.log1p(1 + lam**2))
    torch.testing.assert_close(got[0, 1], gate[0] * torch.log1p(lam))
    assert float(got[0, 3]) == 0.0 and float(got[1, 2]) == pytest.approx(float(gate[1] * np.log(2)))
    assert torch.autograd.gradcheck(bonus, (out, *params))


def test_history_helpers_keep_the_most_recent_position_of_each_item() -> None:
    history = push(torch.tensor([[3, 4, NO_ITEM]]), torch.tensor([4]))
    assert history.tolist() == [[4, 3, 4]]
    assert distinct_history(history).tolist() == [[4, 3, NO_ITEM]]
    prefixes = [np.array([1, 2, 3, 4]), np.array([9])]
    assert recent_items(prefixes, 3).tolist() == [[4, 3, 2], [9, NO_ITEM, NO_ITEM]]


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max", "top1-max"])
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_the_readout_learns_beside_the_network_and_leaves_it_as_without(
    loss: str, kernels: str
) -> None:
    log = deterministic_log(n_items=30, n_sessions=300)
    log = log.with_columns((log["item_idx"] % 6).alias("item_idx"))  # sessions revisit items
    cfg = small_train_config(loss=loss, kernels=kernels, logq=1.0 if loss == "cross-entropy" else 0)
    plain = train_gru4rec(log, 30, ModelConfig(layers=[16]), cfg)
    result = train_gru4rec(
        log,
        30,
        ModelConfig(layers=[16], readout="repeat", repeat_window=4, repeat_holdout=0.0),
        cfg,
    )
    readout = result.model.readout
    assert readout is not None
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert float(readout.gate_b.detach()) != GATE_INIT  # the readout learned
    assert float(readout.gate_w.detach().abs().sum()) > 0
    network = {k: v for k, v in result.model.state_dict().items() if not k.startswith("readout.")}
    assert network.keys() == plain.model.state_dict().keys()
    for name, tensor in plain.model.state_dict().items():  # bit for bit: same seed, same steps
        assert torch.equal(tensor, network[name]), name


def _readout_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """A step of 3 slots over 12 items: outputs, all catalogue scores, history, targets."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    scores = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    history = torch.tensor([[5, 2, 5, 1], [7, NO_ITEM, NO_ITEM, NO_ITEM], [3, 4, 6, 8]])
    targets = torch.tensor([2, 9, 8])  # in the history, not in it, at the oldest position
    return out, scores, history, targets


def _uniform_partition(n_items: int) -> SampledPartition:
    """With α = 0 and the whole catalogue as the draw, the importance estimate of Z is exact."""
    cpu = torch.device("cpu")
    return SampledPartition(torch.ones(n_items), 0.0, cpu, dtype=torch.float64)


def test_the_readout_loss_is_the_full_softmax_likelihood_of_the_boosted_scores() -> None:
    out, scores, history, targets = _readout_inputs(0)
    readout = RepeatReadout(4, window=4).double()
    with torch.no_grad():
        readout.gate_b.fill_(0.7)
        readout.gate_w.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        readout.log_temperature.fill_(0.4)
    rows, everything = torch.arange(3), torch.arange(12)
    got = readout_loss(
        readout,
        _uniform_partition(12),
        out,
        scores[rows, targets],
        (scores, everything),
        scores.gather(1, history.clamp_min(0)),
        history,
        targets,
    )
    # every item's boosted score, at the readout's temperature
    full = (scores + readout.bonus(out, history, everything)) / np.exp(0.4)
    expected = -torch.log_softmax(full, 1)[rows, targets].sum()
    torch.testing.assert_close(got, expected)


def test_the_ranking_head_is_bpr_max_of_the_boosted_scores_over_the_whole_catalogue() -> None:
    """With every item as a column, the head's loss is BPR-max of s + bonus against all other
    items, computed plainly here: a history item counts once, with its bonus."""
    out, scores, history, targets = _readout_inputs(3)
    readout = RepeatReadout(4, window=4).double()
    with torch.no_grad():
        readout.gate_b.fill_(0.9)
        readout.gate_w.copy_(torch.tensor([0.2, 0.4, -0.3, 0.1]))
    everything = torch.arange(12)
    got = ranking_readout_loss(
        readout,
        out,
        scores[torch.arange(3), targets],
        (scores, everything),
        scores.gather(1, history.clamp_min(0)),
        history,
        targets,
    )
    full = scores + readout.bonus(out, history, everything)  # (3, 12)
    expected = torch.zeros((), dtype=torch.float64)
    for row, t in enumerate(targets.tolist()):
        negatives = torch.tensor([j for j in range(12) if j != t])
        weights = torch.softmax(full[row, negatives], 0)
        expected = expected - torch.log(
            (weights * torch.sigmoid(full[row, t] - full[row, negatives])).sum()
        )
    torch.testing.assert_close(got, expected)
    got.backward()  # and the gate learns from it
    assert readout.gate_b.grad is not None and float(readout.gate_b.grad.abs()) > 0


def test_the_ranking_head_on_a_training_step_columns_with_repeats_and_covered_items() -> None:
    """The trainer's columns (the in-batch targets, then samples with repeats, a sample equal to a
    row's target and samples in its history): a column counts once per occurrence unless it is
    the row's target or in its history, which count once, with their bonus."""
    out, scores, history, targets = _readout_inputs(4)
    readout = RepeatReadout(4, window=4).double()
    with torch.no_grad():
        readout.gate_b.fill_(0.5)
        readout.gate_w.copy_(torch.tensor([-0.1, 0.3, 0.2, 0.4]))
    columns = torch.cat((targets, torch.tensor([0, 0, 9, 5, 11, 4, 4])))
    got = ranking_readout_loss(
        readout,
        out,
        scores[torch.arange(3), targets],
        (scores[:, columns], columns),
        scores.gather(1, history.clamp_min(0)),
        history,
        targets,
    )
    expected = torch.zeros((), dtype=torch.float64)
    for row, t in enumerate(targets.tolist()):
        seen = [i for i in history[row].tolist() if i != NO_ITEM]
        negative = [scores[row, c] for c in columns.tolist() if c != t and c not in seen]
        for item in dict.fromkeys(seen):  # distinct, most recent first
            if item != t:
                bonus = readout.bonus(
                    out[row : row + 1], history[row : row + 1], torch.tensor([item])
                )
                negative.append(scores[row, item] + bonus[0, 0])
        r = torch.stack(negative)
        target_bonus = readout.bonus(out[row : row + 1], history[row : row + 1], torch.tensor([t]))
        r_t = scores[row, t] + target_bonus[0, 0]
        expected = expected - torch.log((torch.softmax(r, 0) * torch.sigmoid(r_t - r)).sum())
    torch.testing.assert_close(got, expected)


def test_the_readout_loss_gradient_against_finite_differences() -> None:
    out, scores, history, targets = _readout_inputs(1)
    readout = RepeatReadout(4, window=4).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in readout.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    rows = torch.arange(3)
    samples = torch.tensor([0, 3, 3, 7, 10, 11])  # a draw with a repeat
    support = torch.arange(1.0, 13.0)
    partition = SampledPartition(support, 0.5, torch.device("cpu"), dtype=torch.float64)
    fixed = (scores[rows, targets], (scores[:, samples], samples))

    def loss() -> torch.Tensor:
        hist_scores = scores.gather(1, history.clamp_min(0))
        return readout_loss(readout, partition, out, *fixed, hist_scores, history, targets)

    loss().backward()
    eps = 1e-6
    for name, p in readout.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        for i in range(p.numel()):
            with torch.no_grad():
                flat = p.view(-1)
                flat[i] += eps
                up = float(loss())
                flat[i] -= 2 * eps
                down = float(loss())
                flat[i] += eps
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(float(p.grad.view(-1)[i]), rel=1e-6, abs=1e-8), name


def test_the_sampled_partition_is_exact_for_a_uniform_draw_of_the_whole_catalogue() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 9, generator=gen)
    support = torch.tensor([1.0, 5, 2, 9, 1, 3, 7, 2, 4])
    partition = SampledPartition(support, alpha=0.0, device=torch.device("cpu"))
    torch.testing.assert_close(partition(scores, torch.arange(9)), torch.logsumexp(scores, 1))
    # ∝ pop: each item once, weighted by 1 / pop, still estimates Σ e^s up to the draw's noise
    weighted = SampledPartition(support, alpha=1.0, device=torch.device("cpu"))
    draw = torch.repeat_interleave(torch.arange(9), support.long())  # a draw in exact proportion
    torch.testing.assert_close(weighted(scores[:, draw], draw), torch.logsumexp(scores, 1))


@pytest.fixture(scope="module")
def repeat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainedModel, Path]:
    log = deterministic_log(n_items=40, n_sessions=400)
    model_cfg = ModelConfig(layers=[16], readout="repeat", repeat_window=5)
    network = train_gru4rec(log, 40, model_cfg, small_train_config()).model
    with torch.no_grad():  # a gate that matters, whatever the short training learned
        network.readout.gate_b.fill_(1.5)  # type: ignore[union-attr]
    trained = TrainedModel(network, ItemIndex.of(list(range(1000, 1040))))
    path = tmp_path_factory.mktemp("readout") / "model.pt"
    trained.save(path)
    return trained, path


def test_every_scoring_path_ranks_with_the_readout_alike(
    repeat_model: tuple[TrainedModel, Path],
) -> None:
    trained, path = repeat_model
    network = trained.network
    sessions = [np.array(s) for s in ([3, 7, 3, 9, 7], [1, 2], [5, 5, 6, 30, 31, 5])]
    scorer = GRU4RecScorer(network, fast_ranking=False)
    full = scorer.score_sessions(sessions)  # (N, n)
    prefixes = [s[: t + 1] for s in sessions for t in range(len(s) - 1)]
    torch.testing.assert_close(scorer.score_next(prefixes), full, rtol=0, atol=1e-5)
    with torch.inference_mode():
        outs = network.session_outputs(sessions)
        plain = torch.addmm(network.item_bias, outs, network.item_out.t())
    assert bool((full - plain >= -1e-6).all())  # a bonus, never a malus
    assert float((full - plain).max()) > 0.1  # and it moved something
    for fast in (False, True):
        ranks, top = GRU4RecScorer(network, fast_ranking=fast).rank_sessions(
            sessions, "standard", 5
        )
        assert torch.equal(top, torch.topk(full, 5, dim=1).indices)
    served = SessionRecommender(TrainedModel.load(path), fast_top_k=False)
    live = served.live()
    for i, prefix in enumerate(prefixes):
        ids = [1000 + int(j) for j in prefix]
        expected = [1000 + j for j in torch.topk(full[i], 5).indices.tolist()]
        assert served.recommend(ids, k=5).items == expected
        assert served.recommend_batch([ids, ids[:1]], k=5)[0].items == expected
    for t, item in enumerate(sessions[0][:-1]):
        assert live.click("s", 1000 + int(item), k=5).items == [
            1000 + j for j in torch.topk(full[t], 5).indices.tolist()
        ]


def test_the_certified_pass_with_boosts_equals_full_scoring() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(9000, 32, generator=gen) * 0.3
    bias = torch.randn(9000, generator=gen) * 0.1
    ranker = CatalogueRanker(weights, bias)
    out = torch.tanh(weights[torch.randint(0, 9000, (64,), generator=gen)] * 3)
    items = torch.randint(0, 9000, (64, 6), generator=gen)
    items[:, 4:] = NO_ITEM
    values = torch.rand(64, 6, generator=gen) * 3
    boost = (distinct_history(items), values)
    targets = items[:, 0]
    for rows in (slice(0, 2), slice(0, 64)):  # the int8 pass and the bf16 pass
        part = (boost[0][rows], boost[1][rows])
        got = ranker.top_k(out[rows], 20, targets=targets[rows], boost=part)
        scores = torch.addmm(bias, out[rows], weights.t())
        expected = rank_scores(scores, 20, targets=targets[rows], boost=part)
        assert got.ranks is not None and expected.ranks is not None
        assert torch.equal(got.ranks, expected.ranks)
        torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-5)
        assert got.certified > 0.9 * len(got.items)


def test_held_out_sessions_teach_the_readout_and_never_the_network() -> None:
    log = deterministic_log(n_items=30, n_sessions=200)
    log = log.with_columns((log["item_idx"] % 6).alias("item_idx"))  # sessions revisit items
    model_cfg = ModelConfig(layers=[16], readout="repeat", repeat_window=4, repeat_holdout=0.5)
    cfg = small_train_config(logq=1.0)
    network = GRU4Rec(30, model_cfg, seed=cfg.seed)
    trainer = Trainer(network, cfg, item_support(log, 30), torch.device("cpu"))
    data = session_arrays(log)
    held = trainer.held_out_events(data)
    assert held is not None and np.array_equal(held, trainer.held_out_events(data))  # fixed
    per_session = held[data.offsets[:-1]]
    assert 0.35 < per_session.mean() < 0.65  # about the configured share of the sessions
    for k in range(data.n_sessions):  # whole sessions, never a part of one
        assert len(set(held[data.offsets[k] : data.offsets[k + 1]])) == 1

    before = {k: v.clone() for k, v in network.state_dict().items()}
    inputs, targets = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4])
    history = torch.tensor(
        [[0, 1, 5, 1], [1, 2, 2, -1], [2, 3, -1, -1], [3, 0, 4, -1]]
    )  # input first
    hidden = network.init_hidden(4)
    trainer.train_step(inputs, targets, hidden, history, torch.ones(4, dtype=torch.bool))
    after = network.state_dict()
    for name, tensor in before.items():  # every slot held out: only the readout moved
        assert torch.equal(tensor, after[name]) != name.startswith("readout."), name
    trainer.train_step(inputs, targets, hidden, history, torch.tensor([True, False, True, True]))
    assert not torch.equal(before["w_ih.0"], network.state_dict()["w_ih.0"])  # one slot: learns
