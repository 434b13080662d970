"""The fusion rows: weights chosen on valid (never test), scored through the shared ranker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import pipelines.fusions as fusions
from pipelines.evaluate import run_evaluate
from pipelines.prepare import run_prepare
from pipelines.train import run_train
from recsys.config import ModelConfig, config_from_dict
from recsys.core.errors import RecsysError
from recsys.core.metrics import parse_metric
from recsys.data.preparation import load_prepared
from recsys.evaluation.baselines import make_baseline
from recsys.evaluation.fusion import (
    HybridScorer,
    SessionBonusScorer,
    choose_hybrid,
    choose_weight,
    count_boost,
)
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.training.trainer import train_gru4rec
from tests.conftest import tiny_config
from tests.helpers import deterministic_log, small_train_config


def test_count_boost_is_the_weighted_log_count_of_each_prefix_item() -> None:
    items, values = count_boost([np.array([4, 2, 4, 4]), np.array([7])], weight=2.0)
    assert items.tolist() == [[2, 4], [7, -1]]
    np.testing.assert_allclose(values.numpy(), [[2 * np.log(2), 2 * np.log(4)], [2 * np.log(2), 0]])


def test_a_zero_bonus_is_gru4rec_and_a_bonus_lifts_exactly_the_session_items() -> None:
    log = deterministic_log(n_items=30, n_sessions=400)
    model = train_gru4rec(log, 30, ModelConfig(layers=[16]), small_train_config()).model
    test = log.head(400)
    plain = evaluate(GRU4RecScorer(model), test, show_progress=False).metrics
    assert evaluate(SessionBonusScorer(model, 0.0), test, show_progress=False).metrics == plain
    prefixes = [np.array([3, 5, 3]), np.array([8])]
    lifted = SessionBonusScorer(model, 1.5).score_next(prefixes) - GRU4RecScorer(model).score_next(
        prefixes
    )
    expected = np.zeros((2, 30), dtype=np.float32)
    expected[0, 3], expected[0, 5], expected[1, 8] = (
        1.5 * np.log(3),
        1.5 * np.log(2),
        1.5 * np.log(2),
    )
    np.testing.assert_allclose(lifted.numpy(), expected, atol=1e-5)


def test_fusion_rows_choose_their_weights_on_valid_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tiny_config(
        tmp_path,
        train={"epochs": 1, "max_steps": 40},
        evaluation={
            "baselines": {"pop": {"kind": "pop"}, "stan": {"kind": "stan"}},
            "fusion": {"bonus_weights": [0.0, 1.0], "hybrid_baseline": "stan"},
        },
    )
    config = config_from_dict(raw)
    run_prepare(config, None)
    run_train(config, None)
    assert config.valid_model_file.is_file()  # the train_tr model the weights are chosen with
    data = load_prepared(config.prepared_dir)
    seen: list[pl.DataFrame] = []
    original, original_hybrid = fusions.choose_weight, fusions.choose_hybrid

    def spy(make: Any, valid: pl.DataFrame, *args: Any, **kw: Any) -> Any:
        seen.append(valid)
        return original(make, valid, *args, **kw)

    def spy_hybrid(gru: Any, knn: Any, valid: pl.DataFrame, *args: Any, **kw: Any) -> Any:
        seen.append(valid)
        return original_hybrid(gru, knn, valid, *args, **kw)

    monkeypatch.setattr(fusions, "choose_weight", spy)
    monkeypatch.setattr(fusions, "choose_hybrid", spy_hybrid)
    rows = {r["model"]: r for r in run_evaluate(config, None, force=True)["rows"]}
    assert len(seen) == 2 and all(frame.equals(data.valid) for frame in seen)
    assert rows["gru4rec-bonus"]["weight"] in (0.0, 1.0)
    assert 0.0 <= rows["gru4rec-stan"]["weight"] <= 0.9
    assert rows["gru4rec-stan"]["weights_tried"] == 10
    assert rows["gru4rec-bonus"]["predictions"] == rows["gru4rec"]["predictions"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"evaluation": {"fusion": {"hybrid_baseline": "nope"}}}, "'nope' is not among"),
        (
            {"evaluation": {"fusion": {"hybrid_baseline": "sr", "hybrid_temperatures": []}}},
            "need one value each",
        ),
        ({"evaluation": {"fusion": {"hybrid_temperatures": [0.0]}}}, "greater than 0"),
        (
            {"model": {"readout": "repeat"}, "evaluation": {"fusion": {"bonus_weights": [1.0]}}},
            "fixed session bonus is a fusion of the plain model",
        ),
    ],
)
def test_fusion_settings_that_cannot_run_are_refused_at_load(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecsysError, match=message):
        config_from_dict(tiny_config(tmp_path, **change))


def test_the_hybrid_mixes_gru4recs_softmax_at_its_temperature_with_the_normalised_baseline() -> (
    None
):
    log = deterministic_log(n_items=30, n_sessions=400)
    gru = GRU4RecScorer(
        train_gru4rec(log, 30, ModelConfig(layers=[16]), small_train_config()).model
    )
    knn = make_baseline("stan", 30, None).fit(log)
    prefixes = [np.array([3, 5, 3]), np.array([8]), np.array([1, 2])]
    scores, near = gru.score_next(prefixes), knn.score_next(prefixes).clamp_min(0)
    for temperature, weight in [(1.0, 0.3), (0.2, 0.3), (0.05, 0.7)]:
        mixed = HybridScorer(gru, knn, weight, temperature).score_next(prefixes)
        expected = (1 - weight) * (scores / temperature).softmax(1)
        expected += weight * near / near.sum(1, keepdim=True)
        np.testing.assert_allclose(mixed.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
        assert np.allclose(mixed.sum(1).numpy(), 1.0, atol=1e-5)  # still a distribution


def test_choose_weight_over_settings_keeps_the_smallest_of_equal_ones() -> None:
    log = deterministic_log(n_items=30, n_sessions=400)
    gru = GRU4RecScorer(
        train_gru4rec(log, 30, ModelConfig(layers=[16]), small_train_config()).model
    )
    grid = [(0.5, 0.2), (0.1, 0.9), (0.1, 0.4)]
    best, tried = choose_weight(lambda tw: gru, log.head(300), grid, parse_metric("mrr@20"))
    assert best == (0.1, 0.4) and list(tried) == sorted(grid)  # one scorer: all tie


def test_the_one_pass_hybrid_grid_scores_each_setting_as_its_own_evaluation() -> None:
    log = deterministic_log(n_items=30, n_sessions=400)
    gru = GRU4RecScorer(
        train_gru4rec(log, 30, ModelConfig(layers=[16]), small_train_config()).model
    )
    knn = make_baseline("stan", 30, None).fit(log)
    valid, metric = log.head(600), parse_metric("mrr@5")
    grid = [(1.0, 0.0), (0.3, 0.5), (0.1, 0.9), (1.0, 0.5)]
    best, tried = choose_hybrid(gru, knn, valid, grid, metric, batch_size=64)
    each, one_by_one = choose_weight(
        lambda tw: HybridScorer(gru, knn, tw[1], tw[0]), valid, grid, metric
    )
    assert list(tried) == sorted(grid) and best == each
    assert tried == pytest.approx(one_by_one, abs=1e-12)
    assert len(set(tried.values())) > 1  # the settings do rank differently here
