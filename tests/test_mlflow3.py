"""MLflow 3 as its UI expects it, after a real `recsys pipeline` on a SQLite store: the
model-training experiment kind, the logged model with its linked test metrics, the prepared
splits as dataset inputs, the parent run's description, the results table, the registered
version of the logged model, system metrics, and the UI rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

NAME = "tiny3"
REGISTERED = f"gru4rec-{NAME}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One pipeline run on a fresh store; its runs by step, the stats and the model's meta."""
    root = tmp_path_factory.mktemp("mlflow3")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny_config(root / "work", name=NAME, tracking={"system_metrics_interval": 0.2})
    config = write_config(root / "tiny3.yaml", raw)
    proc = run_cli("pipeline", "--config", str(config), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(NAME)
    runs = {r.data.tags["recsys.step"]: r for r in client.search_runs([exp.experiment_id])}
    run_dir = root / "work" / NAME
    return {
        "root": root,
        "uri": uri,
        "config": config,
        "client": client,
        "experiment": exp,
        "runs": {step: client.get_run(r.info.run_id) for step, r in runs.items()},
        "stats": json.loads((run_dir / "prepared" / "stats.json").read_text()),
        "meta": json.loads((run_dir / "model" / "meta.json").read_text()),
        "prepared": run_dir / "prepared",
        "stdout": proc.stdout,
    }


def logged_models(p: dict[str, Any]) -> list[Any]:
    return list(p["client"].search_logged_models([p["experiment"].experiment_id]))


def dataset_inputs(run: Any) -> dict[tuple[str, str], Any]:
    """(name, context) -> the dataset, for a run's dataset inputs."""
    out = {}
    for entry in run.inputs.dataset_inputs:
        context = next(t.value for t in entry.tags if t.key == "mlflow.data.context")
        out[(entry.dataset.name, context)] = entry.dataset
    return out


def test_new_experiment_is_a_model_training_one_and_an_older_one_gets_the_kind_on_its_next_run(
    pipeline: dict[str, Any],
) -> None:
    assert pipeline["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    client, uri, root = pipeline["client"], pipeline["uri"], pipeline["root"]
    older = client.create_experiment("tiny3-older")  # as recsys made them before the kind
    chosen = client.create_experiment("tiny3-genai", tags={"mlflow.experimentKind": "genai"})
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    for name in ("tiny3-older", "tiny3-genai"):
        config = write_config(root / f"{name}.yaml", tiny_config(root / "work", name=name))
        proc = run_cli("prepare", "--config", str(config), env={"MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai"  # left alone


def test_train_logs_one_logged_model_and_evaluate_links_its_test_metrics_to_it(
    pipeline: dict[str, Any],
) -> None:
    (model,) = logged_models(pipeline)
    train, evaluate = pipeline["runs"]["train"], pipeline["runs"]["evaluate"]
    assert model.source_run_id == train.info.run_id and model.name == REGISTERED
    assert model.tags["recsys.model_fingerprint"] == pipeline["meta"]["model_fingerprint"]
    assert [o.model_id for o in train.outputs.model_outputs] == [model.model_id]
    assert [i.model_id for i in evaluate.inputs.model_inputs] == [model.model_id]
    linked = {m.key: m for m in model.metrics}
    for key in ("gru4rec.recall_at_20", "gru4rec.mrr_at_20", "gru4rec.ndcg_at_10"):
        assert linked[key].value == evaluate.data.metrics[key]
        assert linked[key].dataset_name == f"{NAME}.test"
        assert linked[key].dataset_digest == pipeline["stats"]["fingerprint"]
        assert linked[key].run_id == evaluate.info.run_id
    assert not any(k.startswith("pop.") for k in linked)  # a baseline's metrics are not its


def test_train_and_evaluate_read_the_prepared_splits_as_dataset_inputs(
    pipeline: dict[str, Any],
) -> None:
    fingerprint = pipeline["stats"]["fingerprint"]
    train = dataset_inputs(pipeline["runs"]["train"])
    evaluate = dataset_inputs(pipeline["runs"]["evaluate"])
    assert set(train) == {(f"{NAME}.train", "training")}
    assert set(evaluate) == {(f"{NAME}.test", "test"), (f"{NAME}.train", "training")}
    for (name, _), dataset in (train | evaluate).items():
        split = name.removeprefix(f"{NAME}.")
        assert dataset.digest == fingerprint
        assert json.loads(dataset.source)["uri"] == str(
            (pipeline["prepared"] / f"{split}.parquet").resolve()
        )
        rows = json.loads(dataset.profile)["num_rows"]
        assert rows == pipeline["stats"]["splits"][split]["events"]


def test_pipeline_run_description_has_the_results_the_decision_and_the_commands(
    pipeline: dict[str, Any],
) -> None:
    note = pipeline["runs"]["pipeline"].data.tags["mlflow.note.content"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    evaluate = pipeline["runs"]["evaluate"].data.metrics
    assert "| model | recall@5 |" in note
    for model in ("gru4rec", "pop", "sr"):
        assert f"{evaluate[f'{model}.mrr_at_20']:.4f}" in note  # each model's row, its MRR@20
    assert f"**gru4rec** | **{evaluate['gru4rec.recall_at_5']:.4f}**" in note
    assert "**champion**" in note and f"models:/{REGISTERED}@champion" in note
    assert f"git checkout {head}" in note
    assert f"make pipeline CONFIG={pipeline['config']}" in note


def test_evaluate_logs_the_comparison_as_a_table_beside_the_plots(
    pipeline: dict[str, Any], tmp_path: Path
) -> None:
    client, run = pipeline["client"], pipeline["runs"]["evaluate"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results_table.json", "metrics.png", "metrics_at_k.png"} <= artifacts
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "results_table.json", "type": "table"} in logged
    local = client.download_artifacts(run.info.run_id, "results_table.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert table["columns"][0] == "model" and {r["model"] for r in rows} == {"gru4rec", "pop", "sr"}
    mrr = [r["mrr@20"] for r in rows]
    assert mrr == sorted(mrr, reverse=True)  # best first on the registry metric
    gru = next(r for r in rows if r["model"] == "gru4rec")
    assert gru["mrr@20"] == round(run.data.metrics["gru4rec.mrr_at_20"], 4)


def test_registered_version_is_the_train_runs_logged_model_not_a_second_copy(
    pipeline: dict[str, Any],
) -> None:
    client = pipeline["client"]
    (model,) = logged_models(pipeline)
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert version.source == f"models:/{model.model_id}"
    register = pipeline["runs"]["register"]
    assert client.list_artifacts(register.info.run_id) == []  # no weights logged here
    assert [i.model_id for i in register.inputs.model_inputs] == [model.model_id]


def test_system_metrics_are_sampled_while_the_model_trains(pipeline: dict[str, Any]) -> None:
    client, train = pipeline["client"], pipeline["runs"]["train"]
    cpu = client.get_metric_history(train.info.run_id, "system/cpu_utilization_percentage")
    rss = client.get_metric_history(train.info.run_id, "system/process_memory_rss_megabytes")
    assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu) and max(m.value for m in cpu) > 0
    assert all(m.value > 50 for m in rss)  # a Python process with torch loaded
    assert all(m.timestamp <= train.info.start_time for m in cpu)  # taken during training
    (model,) = logged_models(pipeline)
    assert not any(m.key.startswith("system/") for m in model.metrics)  # the run's, not the model's


def test_system_metrics_switched_off_by_the_config(pipeline: dict[str, Any]) -> None:
    raw = tiny_config(
        pipeline["root"] / "work",
        name="tiny3-quiet",
        train={"epochs": 1},
        tracking={"system_metrics": False, "system_metrics_interval": 0.2},
    )
    config = write_config(pipeline["root"] / "tiny3-quiet.yaml", raw)
    env = {"MLFLOW_TRACKING_URI": pipeline["uri"]}
    for command in ("prepare", "train"):
        proc = run_cli(command, "--config", str(config), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    client = pipeline["client"]
    exp = client.get_experiment_by_name("tiny3-quiet")
    (train,) = client.search_runs([exp.experiment_id], "tags.`recsys.step` = 'train'")
    assert train.data.metrics["train_seconds"] > 0
    assert not [k for k in train.data.metrics if k.startswith("system/")]


def test_rerun_reuses_the_logged_model_and_links_no_metric_twice(
    pipeline: dict[str, Any],
) -> None:
    (before,) = logged_models(pipeline)
    env = {"MLFLOW_TRACKING_URI": pipeline["uri"]}
    proc = run_cli("pipeline", "--config", str(pipeline["config"]), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up to date" in proc.stdout and "reused" in proc.stdout
    (after,) = logged_models(pipeline)
    assert after.model_id == before.model_id
    assert sorted(m.key for m in after.metrics) == sorted(m.key for m in before.metrics)
    client, exp = pipeline["client"], pipeline["experiment"]
    trains = client.search_runs([exp.experiment_id], "tags.`recsys.step` = 'train'")
    assert len(trains) == 2
    for run in trains:  # the cached rerun names the same model as its output
        outputs = client.get_run(run.info.run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [before.model_id]


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)"
)
def test_check_ui_finds_the_training_runs_view_the_run_names_and_the_model(
    pipeline: dict[str, Any],
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "check_ui.py"),
            "--config",
            str(pipeline["config"]),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, **QUIET, "MLFLOW_TRACKING_URI": pipeline["uri"]},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok   training-runs") and "Training runs" in line for line in lines)
    assert any(line.startswith("ok   experiment") and f"pipeline-{NAME}" in line for line in lines)
    assert any(line.startswith("ok   model") and "gru4rec.mrr_at_20" in line for line in lines)
    assert "FAIL" not in proc.stdout


def test_check_ui_without_a_pipeline_run_is_one_clear_line(pipeline: dict[str, Any]) -> None:
    config = write_config(pipeline["root"] / "absent.yaml", tiny_config(pipeline["root"], "absent"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ui.py"), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **QUIET, "MLFLOW_TRACKING_URI": pipeline["uri"]},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("no experiment 'absent'" in line or "Chromium" in line)
