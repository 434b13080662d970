"""recsys tune: a study on train_tr/valid that resumes, survives kill -9, prunes, never reads
test, and leaves a best.yaml that the pipeline runs as it is."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import polars as pl
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipelines.prepare import prepare
from pipelines.tune import run_tune
from pipelines.tune_study import (
    FAILED_ATTR,
    VALUES_ATTR,
    WORKER_ATTR,
    default_storage,
    fail_dead_trials,
    open_storage,
    open_study,
)
from recsys.config import config_from_dict, load_config
from recsys.config.tune import Param
from recsys.core.errors import RecsysError
from recsys.data.schema import TEST, split_file
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

SPACE = {
    "model.layers": {"low": 16, "high": 32, "step": 16},
    "train.learning_rate": {"low": 0.02, "high": 0.2, "log": True},
    "train.loss": {"choices": ["cross-entropy", "bpr-max"]},
    "train.elu_param": {"choices": [0, 0.5, 1], "when": {"train.loss": "bpr-max"}},
}


def tune_config(workdir: str | Path, max_steps: int = 20, **tune: Any) -> dict[str, Any]:
    """The tiny synthetic log, one thread, short epochs: a trial takes about a second."""
    return tiny_config(
        Path(workdir),
        train={"max_steps": max_steps, "threads": 1, "n_sample": 32},
        tune={"n_trials": 3, "max_epochs": 2, "patience": None, "space": SPACE} | tune,
    )


def store_env(folder: Path) -> dict[str, str]:
    (folder / "mlops").mkdir(exist_ok=True)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlops' / 'mlflow.db'}"}


def load_study(folder: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'mlops' / 'optuna.db'}")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def first_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-trial study run through the CLI in a folder of its own (data/ and mlops/ in it)."""
    folder = tmp_path_factory.mktemp("tune")
    write_config(folder / "tiny.yaml", tune_config("data"))
    ok(run_cli("tune", "-c", "tiny.yaml", cwd=folder, env=store_env(folder)))
    return folder


def test_a_study_writes_the_best_trial_as_a_config_that_loads(first_study: Path) -> None:
    study = load_study(first_study)  # the default storage: beside the MLflow store
    assert len(finished(study)) == 3
    best = study.best_trial
    path = first_study / "data" / "tiny" / "tuning" / "best.yaml"
    text = path.read_text()
    assert text.startswith("# Tuned by `recsys tune`")
    assert "3 trials" in text and f"valid mrr@20 {best.value:.4f}" in text
    tuned = load_config(path)
    assert tuned.model.layers == [best.params["model.layers"]]
    assert tuned.train.learning_rate == best.params["train.learning_rate"]
    assert tuned.train.loss == best.params["train.loss"]
    assert tuned.train.epochs == best.user_attrs["best_epoch"]
    assert best.value == max(best.user_attrs["valid"])  # the best epoch's valid metric
    # everything the space does not touch is the original config's
    original = load_config(first_study / "tiny.yaml")
    assert tuned.data == original.data and tuned.evaluation == original.evaluation
    assert tuned.train.max_steps == original.train.max_steps


def test_the_tune_run_has_a_child_run_per_trial_and_the_plots(first_study: Path) -> None:
    client = MlflowClient(tracking_uri=store_env(first_study)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["recsys.step"] == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    best = load_study(first_study).best_trial
    assert parent.data.metrics["best_valid_mrr_at_20"] == pytest.approx(best.value)
    assert parent.data.params["best.train.loss"] == best.params["train.loss"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert {"tuning/best.yaml", "tuning/history.png", "tuning/importances.png"} <= artifacts
    for child in children:
        history = client.get_metric_history(child.info.run_id, "valid_mrr_at_20")
        assert [m.step for m in history] == [1, 2]  # one value per epoch
        assert child.data.tags["recsys.trial_state"] == "COMPLETE"
        assert child.data.metrics["seconds"] > 0


def test_a_rerun_continues_the_study_and_never_reads_test(
    first_study: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(first_study, folder)
    test_file = folder / "data" / "tiny" / "prepared" / split_file(TEST)
    test_file.write_bytes(b"not a parquet file: a trial that reads test fails")
    ok(run_cli("tune", "-c", "tiny.yaml", "--trials", "2", cwd=folder, env=store_env(folder)))
    study = load_study(folder)
    assert [t.number for t in finished(study)] == [0, 1, 2, 3, 4]
    assert "5 trials" in (folder / "data" / "tiny" / "tuning" / "best.yaml").read_text()
    assert test_file.read_bytes().startswith(b"not a parquet")  # nor was it rewritten
    # the rerun drew new points: a seeded sampler restarted must not replay trials 0 and 1
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)


def test_a_worker_killed_mid_trial_loses_only_that_trial(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny.yaml", tune_config("data", max_steps=0, n_trials=2, max_epochs=1))
    env = {**os.environ, **QUIET, **store_env(tmp_path)}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "tune", "-c", "tiny.yaml"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    storage = f"sqlite:///{tmp_path / 'mlops' / 'optuna.db'}"
    running = None
    deadline = time.monotonic() + 120
    while running is None and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if "finished trials; running" not in log.read_text():
            continue  # the worker has not opened the study yet
        trials = optuna.load_study(study_name="tiny", storage=storage).get_trials(
            states=(TrialState.RUNNING,)
        )
        # a trial in its first epoch: far from done when the kill lands
        started = [t for t in trials if WORKER_ATTR in t.user_attrs and not t.intermediate_values]
        running = started[0].number if started else None
    assert running is not None, f"the worker never started a trial: {log.read_text()}"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    left = optuna.load_study(study_name="tiny", storage=storage)
    assert left.trials[running].state == TrialState.RUNNING  # what kill -9 leaves behind
    done_before = len(finished(left))

    result = ok(run_cli("tune", "-c", "tiny.yaml", cwd=tmp_path, env=store_env(tmp_path)))
    assert f"trial {running} was left running by a worker that died: marked failed" in result.stdout
    study = optuna.load_study(study_name="tiny", storage=storage)
    killed = study.trials[running]
    assert killed.state == TrialState.FAIL and "died" in killed.user_attrs[FAILED_ATTR]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(finished(study)) == 2 > done_before  # the rerun completed the study's size
    assert load_config(tmp_path / "data" / "tiny" / "tuning" / "best.yaml").train.epochs >= 1


def test_a_dead_local_worker_fails_its_trial_and_a_live_or_remote_one_does_not(
    tmp_path: Path,
) -> None:
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")  # no heartbeat
    study = optuna.create_study(storage=rdb, study_name="s", direction="maximize")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    host = socket.gethostname()
    workers = [
        {"host": host, "pid": int(gone.stdout), "start": "1"},  # exited: dead
        {"host": host, "pid": os.getpid(), "start": "not this process's"},  # pid reused: dead
        {"host": host, "pid": os.getpid(), "start": ""},  # this process: alive
        {"host": "elsewhere", "pid": int(gone.stdout), "start": "1"},  # the heartbeat's job
    ]
    for worker in workers:
        study.ask().set_user_attr(WORKER_ATTR, worker)
    assert fail_dead_trials(rdb, "s") == [0, 1]
    states = [t.state for t in optuna.load_study(study_name="s", storage=rdb).trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]


def test_pruning_stops_a_bad_trial_after_its_first_epoch_and_trials_read_no_test(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_from_dict(
        tune_config(
            tmp_path,
            max_steps=40,
            pruner={"startup_trials": 1, "warmup_epochs": 0},
            space={"train.learning_rate": {"choices": [0.2, 0.0001]}},
        )
    )
    prepare(config)
    url = default_storage()
    assert url == f"sqlite:///{tmp_path / 'mlops' / 'optuna.db'}"  # beside the MLflow store
    study = optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    study.enqueue_trial({"train.learning_rate": 0.2})
    study.enqueue_trial({"train.learning_rate": 0.0001})  # learns nothing in one epoch
    read: list[str] = []
    real_read = pl.read_parquet
    monkeypatch.setattr(
        pl, "read_parquet", lambda p, *a, **k: read.append(str(p)) or real_read(p, *a, **k)
    )
    monkeypatch.setattr(pl, "scan_parquet", lambda p, *a, **k: pytest.fail(f"scanned {p}"))
    outcome = run_tune(config, None, trials=2)
    good, bad = optuna.load_study(study_name="tiny", storage=url).trials
    assert good.state == TrialState.COMPLETE and good.user_attrs["epochs"] == 2
    assert bad.state == TrialState.PRUNED and bad.user_attrs["epochs"] == 1
    assert max(bad.user_attrs["valid"]) < good.user_attrs["valid"][0]
    assert outcome["best_trial"] == 0
    assert not [p for p in read if p.endswith(split_file(TEST))]
    assert any(p.endswith("train_tr.parquet") for p in read)
    assert good.user_attrs[VALUES_ATTR] == {"train.learning_rate": 0.2}


def test_a_study_of_another_space_is_not_continued(tmp_path: Path, mlflow_store: str) -> None:
    rdb = open_storage(default_storage())
    first = config_from_dict(tune_config(tmp_path))
    open_study(first, rdb, "sqlite://", "data-fingerprint", shared=False)
    other = config_from_dict(
        tune_config(tmp_path, space={"train.momentum": {"low": 0, "high": 0.5}})
    )
    with pytest.raises(RecsysError, match="study 'tiny' in .* was run on another dataset, search"):
        open_study(other, rdb, "sqlite://", "data-fingerprint", shared=False)
    with pytest.raises(RecsysError, match="another dataset"):
        open_study(first, rdb, "sqlite://", "other-data", shared=False)
    open_study(first, rdb, "sqlite://", "data-fingerprint", shared=False)  # the same: continues


@pytest.mark.parametrize(
    ("key", "param", "message"),
    [
        ("train.learning_rate", {"low": 0.3, "high": 0.2}, "low 0.3 is above high 0.2"),
        ("train.learning_rate", {"low": 0, "high": 0.2, "log": True}, "log range needs low > 0"),
        ("train.batch_size", {"low": 32, "high": 100, "step": 16}, "step 16 does not fit"),
        ("train.batch_size", {"low": 32.5, "high": 64}, "takes whole numbers"),
        ("train.lr", {"low": 0.01, "high": 0.1}, "unknown parameter: train has no field 'lr'"),
        ("optimizer.lr", {"low": 0.01, "high": 0.1}, "unknown parameter: a key is model.<field>"),
        ("train.loss", {"choices": []}, "choices is empty"),
        ("train.loss", {"choices": ["bpr_max"]}, "choice 'bpr_max' is not a valid train.loss"),
        (
            "model.dropout_hidden",
            {"low": 0, "high": 1},
            "high 1 is not a valid model.dropout_hidden",
        ),
        ("train.epochs", {"low": 1, "high": 5}, "not searchable"),
        (
            "train.bpreg",
            {"low": 0, "high": 2, "when": {"train.los": "bpr-max"}},
            "'train.los' is not",
        ),
        ("model.layers", [64, 128], "a bare list is ambiguous"),
    ],
)
def test_a_bad_space_is_rejected_at_load_naming_the_key(
    tmp_path: Path, key: str, param: Any, message: str
) -> None:
    path = write_config(tmp_path / "c.yaml", tune_config(tmp_path, space={key: param}))
    with pytest.raises(RecsysError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: invalid configuration")
    assert f"  - tune.space.{key}" in str(err.value) and message in str(err.value)


def test_a_space_names_any_model_or_train_field_and_the_default_loads(tmp_path: Path) -> None:
    space = {
        "model.embedding": {"choices": ["shared", "separate"]},  # a switch: no code needed
        "model.layers": {"choices": [16, [16, 16]]},  # a list field: a number is one layer
        "train.logq": 0.5,  # fixed for every trial
    }
    config = config_from_dict(tune_config(tmp_path, space=space))
    dumped = config.tune.model_dump(mode="json")["space"]
    assert dumped == space | {"train.logq": {"value": 0.5}}  # the keys given, nothing added
    assert config_from_dict(config.model_dump(mode="json")) == config
    default = load_config(ROOT / "configs" / "default.yaml").tune
    assert default.space["model.layers"] == Param(low=64, high=512, step=32)
    assert default.space["train.elu_param"].when == {"train.loss": "bpr-max"}


def test_bad_storage_urls_and_options_are_one_line_errors(
    tmp_path: Path, mlflow_store: str
) -> None:
    write_config(tmp_path / "c.yaml", tune_config(tmp_path))
    for storage, message in (
        ("optuna.db", "is not a database URL"),
        (f"sqlite:///{tmp_path}/no/such/folder/optuna.db", "Optuna storage sqlite:///"),
    ):
        result = run_cli("tune", "-c", str(tmp_path / "c.yaml"), "--storage", storage)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    result = run_cli("tune", "-c", str(tmp_path / "c.yaml"), "--trails", "3")
    assert result.returncode == 2 and "No such option '--trails'" in result.stderr
    assert not (tmp_path / "tiny").exists()  # nothing was prepared
