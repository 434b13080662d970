"""The pipeline end to end through the CLI, against a real SQLite MLflow store and registry."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from recsys.model.kernels import native_kernels
from tests.conftest import ROOT, run_cli, tiny_config, write_config


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("mlflow")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first_run(store: tuple[Path, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root, uri = store
    config = write_config(root / "tiny.yaml", tiny_config(root / "work", name="tiny"))
    proc = run_cli("pipeline", "--config", str(config), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, proc


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pipeline_logs_runs_params_metrics_artifacts_and_registers(
    store: tuple[Path, str], first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    _, uri = store
    _, proc = first_run
    assert "gru4rec" in proc.stdout and "models:/gru4rec-tiny@champion" in proc.stdout
    c = client(uri)
    exp = c.get_experiment_by_name("tiny")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("recsys.step") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {
        r.data.tags["recsys.step"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"prepare", "train", "evaluate", "register"}
    assert parent.data.params["train.batch_size"] == "32"
    assert parent.data.params["model.layers"] == "[32]"
    # the commit the runs were made from: `git rev-parse HEAD` where the CLI ran (the repo root)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(head) == 40 and set(head) <= set("0123456789abcdef")  # a commit, not "unknown"
    for run in (parent, *children.values()):
        assert run.data.tags["recsys.git_commit"] == head, run.data.tags["recsys.step"]
    train = children["train"]
    assert train.data.tags["recsys.data_fingerprint"] and train.data.tags["recsys.config_hash"]
    assert train.data.tags["recsys.products"] == "fp32"  # what train.matmul resolved to
    # what train.kernels (auto) resolved to: native wherever the kernels build (CI included)
    native = native_kernels("auto", torch.device("cpu")) is not None
    assert train.data.tags["recsys.kernels"] == ("native" if native else "torch")
    history = c.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert c.get_metric_history(train.info.run_id, "events_per_second")
    ev = children["evaluate"].data.metrics
    for model in ("gru4rec", "pop", "sr"):
        for metric in ("recall_at_20", "mrr_at_20", "ndcg_at_10", "coverage_at_20"):
            assert f"{model}.{metric}" in ev
    artifacts = {a.path for a in c.list_artifacts(children["evaluate"].info.run_id)}
    assert {"metrics.json", "metrics.csv", "metrics.png"} <= artifacts
    assert "stats.json" in {a.path for a in c.list_artifacts(children["prepare"].info.run_id)}
    assert "loss.png" in {a.path for a in c.list_artifacts(train.info.run_id)}
    version = c.get_model_version_by_alias("gru4rec-tiny", "champion")
    assert version.tags["recsys.metric.mrr_at_20"] == str(ev["gru4rec.mrr_at_20"])


def test_rerun_redoes_nothing_and_registers_no_duplicate(
    store: tuple[Path, str], first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    root, uri = store
    config, _ = first_run
    model_file = root / "work" / "tiny" / "model" / "model.pt"
    mtime = model_file.stat().st_mtime_ns
    proc = run_cli("pipeline", "--config", str(config), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up to date" in proc.stdout
    assert "reused" in proc.stdout
    assert model_file.stat().st_mtime_ns == mtime
    versions = client(uri).search_model_versions("name='gru4rec-tiny'")
    assert len(versions) == 1


def test_champion_gate_and_promote(
    store: tuple[Path, str], first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    root, uri = store
    env = {"MLFLOW_TRACKING_URI": uri}
    # A much worse model (almost no learning) of the same dataset name.
    worse = tiny_config(
        root / "work-worse", name="tiny", train={"learning_rate": 1e-6, "epochs": 1}
    )
    config = write_config(root / "worse.yaml", worse)
    proc = run_cli("pipeline", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "-> challenger" in proc.stdout
    c = client(uri)
    champion = c.get_model_version_by_alias("gru4rec-tiny", "champion")
    challenger = c.get_model_version_by_alias("gru4rec-tiny", "challenger")
    assert str(champion.version) == "1" and str(challenger.version) == "2"
    proc = run_cli("register", "--config", str(config), "--promote", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "forced by --promote" in proc.stdout
    assert str(c.get_model_version_by_alias("gru4rec-tiny", "champion").version) == "2"
    assert len(c.search_model_versions("name='gru4rec-tiny'")) == 2


def test_registered_model_loads_in_a_fresh_process_with_the_same_top_k(
    store: tuple[Path, str], first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    root, uri = store
    champion = client(uri).get_model_version_by_alias("gru4rec-tiny", "champion")
    metas = {
        json.loads(p.read_text())["model_fingerprint"]: p.parent / "model.pt"
        for p in root.glob("work*/tiny/model/meta.json")
    }
    model_file = metas[champion.tags["recsys.model_fingerprint"]]  # the file behind the champion
    script = f"""
import json, os, pandas as pd, mlflow
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/gru4rec-tiny@champion")
from recsys.serving.recommender import SessionRecommender
local = SessionRecommender.load({str(model_file)!r})
session = local.item_ids[:3]
out = model.predict(pd.DataFrame({{"items": [session]}}), params={{"k": 10}})
print(json.dumps({{"pyfunc": out[0]["items"], "local": local.recommend(session, k=10).items}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pyfunc"] == result["local"] and len(result["local"]) == 10


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_tracking_store_is_a_clear_error_and_registers_nothing(
    store: tuple[Path, str], first_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    _, uri = store
    config, _ = first_run
    before = len(client(uri).search_model_versions("name='gru4rec-tiny'"))
    bad = f"http://127.0.0.1:{_closed_port()}"
    proc = run_cli(
        "register", "--config", str(config), env={"MLFLOW_TRACKING_URI": bad}, timeout=120
    )
    assert proc.returncode == 1
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    locked = run_cli(
        "register",
        "--config",
        str(config),
        env={"MLFLOW_TRACKING_URI": "sqlite:////proc/no/such/dir/mlflow.db"},
    )
    assert locked.returncode == 1 and "Traceback" not in locked.stderr
    assert len(client(uri).search_model_versions("name='gru4rec-tiny'")) == before
    assert (
        Path(config).parent / "work" / "tiny" / "model" / "model.pt"
    ).exists()  # local artifacts intact
