"""The evaluation harness: metrics by hand, batched == naive, no leakage, awkward test sets."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.prepare import prepare
from recsys.config import ModelConfig, TrainConfig, config_from_dict
from recsys.core.errors import RecsysError
from recsys.data.batching import session_arrays
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.evaluation.baselines import make_baseline
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import MetricAccumulator, evaluate
from recsys.evaluation.harness import test_sessions as known_sessions
from recsys.evaluation.scorer import SessionScorer
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.ranking import next_item_targets, target_ranks
from recsys.training.trainer import train_gru4rec
from tests.conftest import shared_path, tiny_config


class FixedScores(SessionScorer):
    """Scores that depend only on the last item: a table the test writes by hand."""

    name = "fixed"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table.shape[1])
        self.table = table

    def fit(self, train: pl.DataFrame) -> FixedScores:
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        return self.table[torch.tensor([int(p[-1]) for p in prefixes])]


def test_ranks_in_all_three_tie_modes() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.9]])
    target = torch.tensor([2])  # tied with two others, one item above
    assert target_ranks(scores, target, "conservative").item() == 4  # 1 above + 3 tied
    assert target_ranks(scores, target, "standard").item() == 2  # 1 above + 1
    assert target_ranks(scores, target, "median").item() == 3  # (2 + 4) / 2


def test_metrics_by_hand_including_a_target_beyond_k() -> None:
    acc = MetricAccumulator(cutoffs=[1, 5], n_items=10)
    acc.add(torch.tensor([1.0, 3.0, 7.0]))
    out = acc.result()
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@5"] == pytest.approx(2 / 3)  # rank 7 is beyond K=5
    assert out["mrr@5"] == pytest.approx((1 + 1 / 3) / 3)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert out["mrr@1"] == pytest.approx(1 / 3)


def test_evaluate_counts_every_position_and_uses_conservative_ties() -> None:
    # Item 0 -> scores favour item 1 (tie with 2); item 1 -> item 3 is best.
    table = torch.tensor(
        [
            [0.0, 0.5, 0.5, 0.1],
            [0.0, 0.0, 0.2, 0.9],
            [0.0, 0.0, 0.0, 0.0],
            [0.3, 0.2, 0.1, 0.0],
        ]
    )
    events = pl.DataFrame({"session_id": [1, 1, 1, 2, 2], "item_idx": [0, 1, 3, 3, 0]})
    result = evaluate(FixedScores(table), events, cutoffs=[1, 2], show_progress=False)
    # predictions: 0->1 (rank 2, tie), 1->3 (rank 1), 3->0 (rank 1)
    assert result.predictions == 3
    assert result.metrics["recall@1"] == pytest.approx(2 / 3)
    assert result.metrics["mrr@2"] == pytest.approx((0.5 + 1 + 1) / 3)
    standard = evaluate(
        FixedScores(table), events, cutoffs=[1], ties="standard", show_progress=False
    )
    assert standard.metrics["recall@1"] == pytest.approx(1.0)
    assert result.metrics == naive_evaluate(FixedScores(table), events, cutoffs=[1, 2]) | {
        "coverage@20": result.metrics["coverage@20"]
    }


def test_tiny_test_set_and_all_unknown_sessions_are_reported_not_crashed() -> None:
    table = torch.rand(5, 5, generator=torch.Generator().manual_seed(0))
    events = pl.DataFrame(
        {"session_id": [1, 1, 2, 2, 3, 3, 3], "item_idx": [0, 1, None, None, 2, None, 4]},
        schema={"session_id": pl.Int64, "item_idx": pl.Int64},
    )
    result = evaluate(FixedScores(table), events, batch_size=512, show_progress=False)
    assert result.predictions == 2  # session 1: one; session 3 stitched to [2, 4]: one
    assert result.unknown_events == 3
    assert result.skipped_sessions == 1  # session 2 had no known item
    empty = evaluate(
        FixedScores(table), events.filter(pl.col("session_id") == 2), show_progress=False
    )
    assert empty.predictions == 0 and empty.skipped_sessions == 1
    assert all(v == 0.0 for k, v in empty.metrics.items() if not k.startswith("coverage"))


@pytest.fixture(scope="module")
def rsc15(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    folder = shared_path("yoochoose-rsc15-100k")
    raw = tiny_config(tmp_path_factory.mktemp("rsc15"), name="rsc15")
    raw["data"] = {
        "source": {
            "format": "gru4rec_tsv",
            "path": [
                str(folder / "yoochoose-clicks-100k_train_full.txt"),
                str(folder / "yoochoose-clicks-100k_test.txt"),
            ],
        },
        "preparation": {"dedup_consecutive": False, "test_days": 1},
    }
    config = config_from_dict(raw)
    prepare(config)
    return load_prepared(config.prepared_dir)


def test_batched_equals_naive_for_gru4rec_and_a_baseline(rsc15: PreparedDataset) -> None:
    cfg = TrainConfig(batch_size=32, epochs=1, n_sample=64, sample_store_size=6400, max_steps=150)
    model = train_gru4rec(rsc15.train, rsc15.n_items, ModelConfig(layers=[24]), cfg).model
    sample = rsc15.test.filter(
        pl.col("session_id").is_in(
            rsc15.test["session_id"].unique(maintain_order=True).head(60).implode()
        )
    )
    for rec in (
        GRU4RecScorer(model),
        make_baseline("sr", rsc15.n_items, {}).fit(rsc15.train),
    ):
        for ties in ("conservative", "standard", "median"):
            batched = evaluate(
                rec, sample, cutoffs=[1, 5, 20], ties=ties, batch_size=37, show_progress=False
            )
            naive = naive_evaluate(rec, sample, cutoffs=[1, 5, 20], ties=ties)
            for key, value in naive.items():
                assert batched.metrics[key] == pytest.approx(value, abs=1e-12), (
                    rec.name,
                    ties,
                    key,
                )


def test_evaluation_never_changes_a_model(rsc15: PreparedDataset) -> None:
    cfg = TrainConfig(batch_size=32, epochs=1, n_sample=32, sample_store_size=3200, max_steps=50)
    model = train_gru4rec(rsc15.train, rsc15.n_items, ModelConfig(layers=[16]), cfg).model
    test = rsc15.test.head(2000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(GRU4RecScorer(model), test, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for kind in ("pop", "spop", "iknn", "sr", "vsknn", "stan"):
        baseline = make_baseline(kind, rsc15.n_items, {}).fit(rsc15.train)
        frozen = pickle.dumps(baseline.__dict__)
        evaluate(baseline, test, show_progress=False)
        assert pickle.dumps(baseline.__dict__) == frozen, kind


def test_the_evaluate_step_fits_baselines_on_train_only(
    rsc15: PreparedDataset, tmp_path: Path
) -> None:
    """Test sessions repeat a transition a -> b that never occurs in train. Had the step fitted a
    baseline on test events, sequential rules would rank b first after a; fitted on train they
    cannot, and the step's numbers equal those of a model fitted on train by hand."""
    import dataclasses

    from pipelines.evaluate import evaluate_dataset

    pairs = set(
        zip(
            rsc15.train["item_idx"][:-1].to_list(),
            rsc15.train["item_idx"][1:].to_list(),
            strict=True,
        )
    )
    a, b = next(
        (x, y)
        for x in range(rsc15.n_items)
        for y in range(rsc15.n_items)
        if x != y and (x, y) not in pairs
    )
    leaky = pl.DataFrame(
        {"session_id": np.repeat(np.arange(50), 2), "item_idx": [a, b] * 50},
        schema={"session_id": pl.Int64, "item_idx": pl.Int64},
    )
    data = dataclasses.replace(rsc15, test=leaky)
    raw = tiny_config(tmp_path, name="leak")
    raw["evaluation"] = {"baselines": {"sr": {"kind": "sr"}}}
    config = config_from_dict(raw)
    cfg = TrainConfig(batch_size=32, epochs=1, n_sample=16, sample_store_size=1600, max_steps=5)
    model = train_gru4rec(rsc15.train, rsc15.n_items, ModelConfig(layers=[8]), cfg).model
    TrainedModel(model, ItemIndex.of(range(rsc15.n_items))).save(config.model_file)
    rows = {r["model"]: r for r in evaluate_dataset(config, data, key="k")["rows"]}
    by_hand = evaluate(
        make_baseline("sr", rsc15.n_items, {}).fit(rsc15.train), leaky, show_progress=False
    )
    assert rows["sr"]["recall@1"] == by_hand.metrics["recall@1"] < 1.0


def test_fast_ranking_equals_full_fp32_scoring(rsc15: PreparedDataset) -> None:
    """The certified pass (forced on: this catalogue is below its default size) against full
    fp32 scoring, with and without excluding the prefix's items, ranks and metrics alike."""
    cfg = TrainConfig(batch_size=32, epochs=1, n_sample=64, sample_store_size=6400, max_steps=300)
    model = train_gru4rec(rsc15.train, rsc15.n_items, ModelConfig(layers=[64]), cfg).model
    fast, plain = GRU4RecScorer(model, fast_ranking=True), GRU4RecScorer(model, fast_ranking=False)
    sessions = [s for s in session_arrays(rsc15.test).sessions() if len(s) >= 2][:400]
    for ties in ("conservative", "standard", "median"):
        for exclude_seen in (False, True):
            fast_ranks, fast_top = fast.rank_sessions(sessions, ties, 20, exclude_seen)
            ranks, top = plain.rank_sessions(sessions, ties, 20, exclude_seen)
            within = ranks <= 20
            assert 0.05 < float(within.float().mean()) < 1.0  # hits and misses both tested
            assert torch.equal(fast_ranks[within], ranks[within]), (ties, exclude_seen)
            assert bool((fast_ranks[~within] > 20).all())
            assert torch.equal(torch.sort(fast_top, 1).values, torch.sort(top, 1).values)
    with torch.inference_mode():  # the cheap pass itself settled the rows, not the fallback
        out = model.session_outputs(sessions)
        certified = fast.ranker.top_k(out, 20, targets=next_item_targets(sessions)).certified
    assert certified > 0.9 * len(out)
    for exclude_seen in (False, True):
        fast_metrics = evaluate(fast, rsc15.test, exclude_seen=exclude_seen, show_progress=False)
        plain_metrics = evaluate(plain, rsc15.test, exclude_seen=exclude_seen, show_progress=False)
        assert fast_metrics.metrics == plain_metrics.metrics


# The slow reference the batched harness must match: no shared code with it but test_sessions.
def naive_evaluate(
    model: SessionScorer,
    events: pl.DataFrame,
    cutoffs: Sequence[int] = (1, 5, 10, 20),
    ties: str = "conservative",
) -> dict[str, float]:
    """One prefix at a time, one rank at a time: the slow reference the batched path must match."""
    sessions, _, _ = known_sessions(events)
    ranks: list[float] = []
    for s in sessions:
        for t in range(len(s) - 1):
            scores = model.score_next([s[: t + 1]])[0]
            target = float(scores[int(s[t + 1])])
            greater = sum(1 for v in scores.tolist() if v > target)
            equal = sum(1 for v in scores.tolist() if v == target)
            if ties == "standard":
                ranks.append(greater + 1)
            elif ties == "conservative":
                ranks.append(greater + equal)
            else:
                ranks.append(greater + (equal + 1) / 2)
    out: dict[str, float] = {}
    n = len(ranks)
    for k in cutoffs:
        out[f"recall@{k}"] = sum(r <= k for r in ranks) / n
        out[f"mrr@{k}"] = sum(1 / r for r in ranks if r <= k) / n
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / n
    return out


def test_evaluating_a_model_of_another_preparation_is_refused(tmp_path: Path) -> None:
    """A re-prepare without a retrain: the old model's item indices mean other items now."""
    from pipelines.evaluate import run_evaluate
    from pipelines.prepare import run_prepare
    from pipelines.train import run_train

    raw = tiny_config(tmp_path, train={"epochs": 1, "max_steps": 20})
    run_prepare(config_from_dict(raw), None)
    run_train(config_from_dict(raw), None)
    raw["data"]["preparation"]["min_item_support"] = 8
    run_prepare(config_from_dict(raw), None)
    with pytest.raises(RecsysError, match="trained on another preparation of the data"):
        run_evaluate(config_from_dict(raw), None)
