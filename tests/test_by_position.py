"""Metrics by position in the session: per-bucket ranks by hand, the weighted-mean identity, and
the evaluate step's by_position.csv / .png in the run's folder and in MLflow."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from recsys.core.metrics import METRICS, metric_name
from recsys.evaluation.harness import POSITION_BUCKETS, evaluate, position_label
from recsys.evaluation.scorer import SessionScorer
from tests.conftest import run_cli, tiny_config, write_config


class LastItemTable(SessionScorer):
    """Scores that depend only on the prefix's last item, from a table the test holds."""

    name = "table"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table.shape[1])
        self.table = table

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        return self.table[torch.tensor([int(p[-1]) for p in prefixes])]


def events_of(sessions: list[list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "session_id": [i for i, s in enumerate(sessions) for _ in s],
            "item_idx": [x for s in sessions for x in s],
        },
        schema={"session_id": pl.Int64, "item_idx": pl.Int64},
    )


def metric_values(rank: float, k: int) -> dict[str, float]:
    hit = rank <= k
    return {
        "recall": float(hit),
        "mrr": 1 / rank if hit else 0.0,
        "ndcg": 1 / math.log2(rank + 1) if hit else 0.0,
    }


def test_each_bucket_holds_the_ranks_of_predictions_after_that_many_clicks() -> None:
    """Ranks worked out one prediction at a time (conservative ties: items scored above the
    target plus those tied with it), grouped by clicks seen, 10 and more in one bucket."""
    table = torch.rand(6, 6, generator=torch.Generator().manual_seed(1))
    table[2, 4] = table[2, 5]  # one tie, which counts against the target
    sessions = [[0, 1], [2, 4, 3], [5, 2, 5, 1, 0], [i % 6 for i in range(13)]]
    cutoffs = [1, 3]
    expected: dict[int, list[float]] = {}
    for s in sessions:
        for t in range(1, len(s)):
            scores = table[s[t - 1]].tolist()
            target = scores[s[t]]
            rank = sum(v > target for v in scores) + sum(v == target for v in scores)
            expected.setdefault(min(t, POSITION_BUCKETS), []).append(rank)
    result = evaluate(
        LastItemTable(table), events_of(sessions), cutoffs=cutoffs, show_progress=False
    )
    rows = {r["position"]: r for r in result.by_position}
    assert list(rows) == [position_label(b) for b in sorted(expected)]
    assert rows[">=10"]["predictions"] == 3  # clicks 10, 11 and 12 of the 13-click session
    for bucket, ranks in expected.items():
        row = rows[position_label(bucket)]
        assert row["predictions"] == len(ranks)
        for k in cutoffs:
            for metric in METRICS:
                want = sum(metric_values(r, k)[metric] for r in ranks) / len(ranks)
                assert row[metric_name(metric, k)] == pytest.approx(want), (bucket, metric, k)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_buckets_weighted_by_predictions_give_the_overall_metrics(exclude_seen: bool) -> None:
    """Over many sessions of every length and batches that split them, the counts add up to the
    predictions and the prediction-weighted mean of each bucket's metric is the overall one;
    the buckets do not depend on how sessions fall into batches."""
    rng = np.random.default_rng(7)
    sessions = [rng.integers(0, 40, size=rng.integers(2, 25)).tolist() for _ in range(150)]
    scorer = LastItemTable(torch.rand(40, 40, generator=torch.Generator().manual_seed(2)))
    kwargs = {"cutoffs": [1, 5, 20], "exclude_seen": exclude_seen, "show_progress": False}
    result = evaluate(scorer, events_of(sessions), batch_size=37, **kwargs)
    assert sum(r["predictions"] for r in result.by_position) == result.predictions
    assert len(result.by_position) == POSITION_BUCKETS
    for key in (metric_name(m, k) for m in METRICS for k in (1, 5, 20)):
        weighted = sum(r[key] * r["predictions"] for r in result.by_position)
        assert weighted / result.predictions == pytest.approx(result.metrics[key]), key
    one_batch = evaluate(scorer, events_of(sessions), batch_size=100_000, **kwargs)
    for split, whole in zip(result.by_position, one_batch.by_position, strict=True):
        assert split.pop("position") == whole.pop("position")
        assert split == pytest.approx(whole)


def test_recsys_evaluate_writes_the_table_for_every_model_and_logs_it_to_mlflow(
    tmp_path: Path,
) -> None:
    """``recsys evaluate`` as a subprocess against a SQLite store: by_position.csv holds every
    model of metrics.json, each bucket's counts adding up to the predictions; the table and the
    plot are artifacts of the evaluate run; a cached evaluation from before the table existed is
    evaluated again rather than left without one."""
    from pipelines.evaluate import run_evaluate
    from pipelines.prepare import run_prepare
    from pipelines.train import run_train
    from recsys.config import load_config

    raw = tiny_config(tmp_path / "work", name="bypos", train={"epochs": 1})
    config_path = write_config(tmp_path / "bypos.yaml", raw)
    config = load_config(config_path)
    run_prepare(config, None)
    run_train(config, None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("evaluate", "-c", str(config_path), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = config.evaluation_dir
    assert f"by position in the session: {out / 'by_position.csv'}" in proc.stdout
    results = json.loads((out / "metrics.json").read_text())
    table = pl.read_csv(out / "by_position.csv")
    models = [r["model"] for r in results["rows"]]
    assert sorted(set(table["model"])) == sorted(models) and len(models) == 3
    for row in results["rows"]:
        mine = table.filter(pl.col("model") == row["model"])
        assert mine["predictions"].sum() == row["predictions"]
        assert mine["position"].to_list()[-1] == ">=10"
    assert {"mrr@20", "recall@20", "ndcg@1"} <= set(table.columns)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bypos")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "tags.`recsys.step` = 'evaluate'")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"by_position.csv", "by_position.png"} <= artifacts

    del results["by_position"]  # as an evaluation cached by an older recsys left it
    (out / "metrics.json").write_text(json.dumps(results))
    (out / "by_position.csv").unlink()
    again = run_evaluate(config, None)
    assert again["by_position"] and (out / "by_position.csv").exists()
    assert pl.read_csv(out / "by_position.csv").equals(table)
