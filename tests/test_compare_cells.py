"""``recsys compare-cells`` and the train step's gradient norms, as subprocesses against SQLite
MLflow stores on the embedded synthetic default, one epoch."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from pipelines.compare_cells import TABLE_CSV, WINDOW, WINDOW_CELLS, cells
from tests.conftest import run_cli, tiny_config, write_config


def test_compare_cells_logs_a_parent_run_a_child_per_variant_and_the_table(
    tmp_path: Path,
) -> None:
    raw = tiny_config(tmp_path / "work", name="cells", train={"epochs": 1, "max_steps": 40})
    config_path = write_config(tmp_path / "cells.yaml", raw)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("compare-cells", "-c", str(config_path), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {(c, 1) for c in cells()} | {(c, WINDOW) for c in WINDOW_CELLS if c in cells()}
    out = tmp_path / "work" / "cells" / "cells"
    table = pl.read_csv(out / TABLE_CSV)
    assert set(zip(table["cell"], table["bptt"], strict=True)) == expected
    assert {"recall@20", "mrr@20", "mrr@20 after 1", "events_per_second", "parameters"} <= set(
        table.columns
    )
    assert table["train_seconds"].min() > 0

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cells")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "compare-cells-cells"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    params = {(r.data.params["model.cell"], int(r.data.params["train.bptt"])) for r in children}
    assert params == expected and len(children) == len(expected)
    for child in children:
        assert 0 < child.data.metrics["mrr_at_20"] <= 1
        has_lags = "grad_norm_lag_0" in child.data.metrics
        assert has_lags == (int(child.data.params["train.bptt"]) > 1)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {TABLE_CSV, "cells_table.json", "by_position.png", "grad_norms_by_cell.png"} <= artifacts

    # a rerun measures nothing again: the same table, a second parent run of cached children
    again = run_cli("compare-cells", "-c", str(config_path), env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert pl.read_csv(out / TABLE_CSV).equals(table)
    runs = client.search_runs([experiment.experiment_id], "tags.`recsys.cached` = 'true'")
    assert len(runs) == len(expected)


def test_train_with_a_window_logs_the_gradient_norm_by_lag_and_its_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.prepare import run_prepare
    from pipelines.tracking import Tracker
    from pipelines.train import run_train
    from recsys.config import load_config

    train = {"epochs": 1, "bptt": 3, "max_steps": 40}
    config_path = write_config(tmp_path / "lags.yaml", tiny_config(tmp_path, "lags", train=train))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = load_config(config_path)
    run_prepare(config, None)
    run_train(config, Tracker(config))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lags")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "tags.`recsys.step` = 'train'")
    norms = [run.data.metrics[f"grad_norm_lag_{j}"] for j in range(3)]
    assert all(n > 0 for n in norms)
    assert "grad_norms.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
