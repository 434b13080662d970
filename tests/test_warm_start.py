"""Daily retraining (issue #15): warm starts that add new items, resume after a kill, the replay.

The mapping is checked on real training state; the CLI runs as a subprocess on a tiny synthetic
log (28 days, so the replay has days to replay) with a private SQLite MLflow store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from pipelines.prepare import prepare
from pipelines.replay_days import day_starts, replay_log, train_cold, train_warm_day
from recsys.config import ModelConfig, config_from_dict
from recsys.core.errors import RecsysError
from recsys.data.preparation import load_prepared
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.serving.recommender import SessionRecommender
from recsys.training.trainer import train_gru4rec
from recsys.training.warm_start import merged_ids, warm_start
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config
from tests.helpers import deterministic_log, small_train_config


def test_warm_start_keeps_known_rows_by_raw_id_gives_new_items_fresh_rows_and_carries_adagrad(
    tmp_path: Path,
) -> None:
    model_cfg = ModelConfig(layers=[16], embedding="separate")
    cfg = small_train_config(momentum=0.3)
    base = train_gru4rec(deterministic_log(), 30, model_cfg, cfg)
    base_ids = [1000 + i for i in range(30)]
    file = tmp_path / "base.pt"
    TrainedModel(base.model, ItemIndex.of(base_ids), optimizer=base.optimizer).save(file)
    loaded = TrainedModel.load(file)  # weights_only: the optimiser state is plain tensors
    assert loaded.optimizer is not None
    # today: the base's items in another order, minus two, plus two new ones
    today = [1029, 7, 1003, 1000, 8, *(1000 + i for i in range(4, 29))]
    ids = merged_ids(base_ids, today)
    assert ids[: len(today)] == today and ids[len(today) :] == [1001, 1002]  # kept rows
    support = torch.zeros(len(ids), dtype=torch.float64)
    warm = warm_start(
        loaded.network, base_ids, loaded.items.support, loaded.optimizer, ids, support,
        model_cfg, 0.3, 42, "k",
    )  # fmt: skip
    fresh = GRU4Rec(len(ids), model_cfg, seed=42).state_dict()
    old_rows = loaded.optimizer["rows"]
    for new_row, raw in enumerate(ids):
        if raw in (7, 8):  # new: the new model's initial row, zero bias, zero optimiser state
            for name in ("item_out", "item_in"):
                assert torch.equal(warm.state[name][new_row], fresh[name][new_row])
                assert not warm.optimizer["rows"][name][new_row].any()
            assert warm.state["item_bias"][new_row] == 0
            assert warm.support[new_row] == 0
            continue
        old_row = base_ids.index(raw)
        for name in ("item_out", "item_in", "item_bias"):
            assert torch.equal(
                warm.state[name][new_row], loaded.network.state_dict()[name][old_row]
            )
            assert torch.equal(warm.optimizer["rows"][name][new_row], old_rows[name][old_row])
        assert warm.support[new_row] == 1.0  # the base's support, plus no click today
    assert warm.new_items == 2
    dense = loaded.optimizer["acc"]
    assert dense and all(torch.equal(warm.optimizer["acc"][n], dense[n]) for n in dense)
    assert all(torch.equal(warm.optimizer["vel"][n], loaded.optimizer["vel"][n]) for n in dense)


def _clicks(sessions: list[list[int]], day: datetime) -> pl.DataFrame:
    rows = [
        (s, item, day + timedelta(minutes=s, seconds=t))
        for s, items in enumerate(sessions)
        for t, item in enumerate(items)
    ]
    return pl.DataFrame(rows, schema=["session_id", "item_id", "timestamp"], orient="row")


def test_an_item_first_seen_on_day_d_is_recommended_after_the_update_and_unknown_before(
    tmp_path: Path,
) -> None:
    raw = tiny_config(tmp_path, train={"epochs": 3, "n_sample": 16, "threads": 1})
    config = config_from_dict(raw)
    day0 = datetime(2024, 3, 1, tzinfo=UTC)
    history = [[i % 40, (i * 7 + 3) % 40, (i * 3 + 1) % 40] for i in range(400)]
    base = train_cold(config, _clicks(history, day0)).model
    # day d: item 999 launches, and the sessions that click item 5 go on to it
    today = [[5, 999] for _ in range(150)] + history[:100]
    updated = train_warm_day(config, base, _clicks(today, day0 + timedelta(days=1)), "1")
    assert updated.new_items == 1 and updated.model.items.ids[-1] == 999
    after = SessionRecommender(updated.model).recommend([5], k=5)
    assert 999 in after.items, after
    before = SessionRecommender(base).recommend([5, 999], k=5)
    assert before.unknown == [999] and 999 not in before.items  # said, not an error


Base = tuple[Path, dict[str, str], Path, dict[str, Any]]


@pytest.fixture(scope="module")
def cold_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """A tiny config (28 days) prepared and trained cold through the CLI, once for the module;
    its model file copied to base.pt (the base the warm starts continue), the config as a dict.
    Tests write configs of their own beside it and leave tiny.yaml as it is."""
    tmp_path = tmp_path_factory.mktemp("warm")
    raw = tiny_config(tmp_path / "a", train={"epochs": 1, "threads": 1})
    raw["data"]["source"]["synthetic"]["days"] = 28
    config = write_config(tmp_path / "tiny.yaml", raw)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    prepare(config_from_dict(raw))
    proc = run_cli("train", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    base = tmp_path / "base.pt"
    shutil.copy(tmp_path / "a" / "tiny" / "model" / "model.pt", base)
    shutil.rmtree(tmp_path / "a" / "tiny" / "checkpoints")
    return config, env, base, raw


def test_warm_start_killed_and_resumed_gives_the_weights_of_an_uninterrupted_one(
    cold_base: Base, tmp_path: Path
) -> None:
    tiny, env, base, raw = cold_base
    raw = raw | {"train": raw["train"] | {"epochs": 12, "window_days": 3}}
    shutil.copytree(tiny.parent / "a", tmp_path / "a")
    shutil.copytree(tiny.parent / "a", tmp_path / "b")
    config = write_config(tmp_path / "warm.yaml", raw | {"workdir": str(tmp_path / "a")})
    straight = write_config(tmp_path / "straight.yaml", raw | {"workdir": str(tmp_path / "b")})
    warm = ["train", "--warm-start", str(base)]
    assert run_cli(*warm, "-c", str(straight), env=env).returncode == 0
    # killed with SIGKILL once the first epoch's checkpoint is written, then resumed
    command = [sys.executable, "-m", "pipelines.cli", *warm, "-c", str(config)]
    checkpoint = tmp_path / "a" / "tiny" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **QUIET, **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the warm start ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 12
    resumed = run_cli(*warm, "--resume", "-c", str(config), env=env)
    assert resumed.returncode == 0, resumed.stderr
    a = TrainedModel.load(tmp_path / "a" / "tiny" / "model" / "model.pt")
    b = TrainedModel.load(tmp_path / "b" / "tiny" / "model" / "model.pt")
    assert a.items == b.items and a.lineage == b.lineage
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.lineage["base"] == str(base)


def test_warm_start_from_another_network_and_replay_of_too_many_days_are_one_clear_error_each(
    cold_base: Base,
) -> None:
    config, env, base, raw = cold_base
    other = write_config(config.with_name("other.yaml"), raw | {"model": {"layers": [24]}})
    proc = run_cli("train", "-c", str(other), "--warm-start", str(base), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: warm start from {base}: the base model has model.layers = [32] but the config "
        f"has [24]; a warm start needs the same network (train cold, or set model.layers: [32])"
    ]
    log = replay_log(load_prepared(config_from_dict(raw).prepared_dir))
    with pytest.raises(
        RecsysError, match=r"^replay --days 30: the log spans 2\d\.\d days; at most"
    ):
        day_starts(log, 30)


def test_replay_logs_a_child_run_per_day_and_registers_versions_naming_base_and_window(
    cold_base: Base, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, env, _, _ = cold_base
    proc = run_cli("replay", "-c", str(config), "--days", "2", "--cold-every", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "replay-tiny"]
    days = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.info.run_name,
    )
    assert [r.info.run_name for r in days] == ["replay-day-1", "replay-day-2"]
    for run in days:
        metrics = run.data.metrics
        assert 0 < metrics["warm.mrr_at_20"] <= metrics["warm.recall_at_20"] <= 1
        assert metrics["warm.seconds"] > 0 and metrics["warm.clicks"] > 0
        assert 0 <= metrics["young_1d"] <= metrics["young_7d"] <= 1
    assert "cold.mrr_at_20" in days[0].data.metrics  # day 1 of every 2
    assert "cold.mrr_at_20" not in days[1].data.metrics
    assert "paired.seconds_ratio" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"replay.png", "replay.json"} <= artifacts
    versions = {
        int(v.version): v.tags for v in client.search_model_versions("name='gru4rec-tiny-replay'")
    }
    assert sorted(versions) == [1, 2, 3]  # the first model, then one per day
    assert versions[1]["recsys.replay"] == "seed" and versions[1]["recsys.base_version"] == "none"
    for v in (2, 3):
        assert versions[v]["recsys.base_version"] == str(v - 1)
        first, last = versions[v]["recsys.window"].split("/")
        assert datetime.fromisoformat(last) - datetime.fromisoformat(first) < timedelta(days=1)
    assert versions[3]["recsys.window"] > versions[2]["recsys.window"]
    champion = client.get_model_version_by_alias("gru4rec-tiny-replay", "champion")
    assert int(champion.version) in (2, 3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    served = SessionRecommender.load("models:/gru4rec-tiny-replay@champion")
    assert served.trained.lineage["window"] == versions[int(champion.version)]["recsys.window"]
