"""Fault injection (issue #19): a step killed with SIGKILL at a random point, a full disk, a
store that never answers. After each fault nothing that was complete is lost, nothing half
written is trusted, and the next run succeeds and leaves no temporary files behind.

The kill points are drawn from a seeded generator (the same on every run); each lands while the
step runs (the step is still running when the signal is sent, checked).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.data.preparation import data_fingerprint, load_prepared
from recsys.model.artifact import TrainedModel
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

RNG = random.Random(19)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def kill_after(command: list[str], env: dict[str, str], low: float, high: float) -> float:
    """Start ``command``, SIGKILL it after a random delay in [low, high) s; the delay used.

    A step that ends before its kill point (a quiet machine is faster than the window assumed)
    is started again with the window halved, up to three times: the kill must land mid-step."""
    for _ in range(3):
        delay = RNG.uniform(low, high)
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **QUIET, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return delay
        low, high = low / 2, high / 2
    pytest.fail(f"the step ended before every kill point (the last {delay:.2f} s)")


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    config = write_config(
        tmp_path / "tiny.yaml",
        tiny_config(tmp_path / "data", train={"epochs": 2, "max_steps": 60}),
    )
    return config, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def assert_prepared_complete_or_absent(prepared: Path) -> None:
    if prepared.exists():
        data = load_prepared(prepared)  # complete: every file there and readable
        assert data.stats["fingerprint"] == data_fingerprint(prepared)


def test_prepare_killed_at_random_points_leaves_complete_output_or_none(
    setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = setup
    prepared = config.parent / "data" / "tiny" / "prepared"
    for _ in range(2):
        kill_after(cli("prepare", "-c", str(config), "--force"), env, 1.5, 4.0)
        assert_prepared_complete_or_absent(prepared)
    proc = run_cli("prepare", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert_prepared_complete_or_absent(prepared)
    assert prepared.exists() and leftovers(config.parent / "data") == []


def test_train_killed_midway_keeps_no_half_model_and_resumes(
    setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = setup
    assert run_cli("prepare", "-c", str(config), env=env).returncode == 0
    kill_after(cli("train", "-c", str(config)), env, 3.0, 6.0)
    run_dir = config.parent / "data" / "tiny"
    model = run_dir / "model" / "model.pt"
    if model.exists():
        TrainedModel.load(model)  # a model file there is a whole one
    proc = run_cli("train", "-c", str(config), "--resume", env=env)
    assert proc.returncode == 0, proc.stderr
    TrainedModel.load(model)
    assert leftovers(run_dir) == []


def test_register_killed_midway_leaves_a_loadable_champion_or_none(
    setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = setup
    for step in ("prepare", "train", "evaluate"):
        proc = run_cli(step, "-c", str(config), env=env)
        assert proc.returncode == 0, proc.stderr
    kill_after(cli("register", "-c", str(config)), env, 2.0, 4.0)
    score = ["recommend", "-m", "models:/gru4rec-tiny@champion", "-i", "1,2"]
    after_kill = run_cli(*score, env=env)
    assert "Traceback" not in after_kill.stderr
    if after_kill.returncode != 0:  # no champion yet: said in one line
        assert after_kill.stderr.startswith("error: ")
    proc = run_cli("register", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert run_cli(*score, env=env).returncode == 0


def _small_files_only() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_during_prepare_is_one_line_and_writes_nothing(
    setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = setup
    proc = subprocess.run(
        cli("prepare", "-c", str(config)),
        cwd=ROOT,
        env={**os.environ, **QUIET, **env},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_small_files_only,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "file too large" in lines[0], proc.stderr
    data = config.parent / "data"
    assert not (data / "tiny" / "prepared").exists() and leftovers(data) == []


def test_a_store_that_never_answers_fails_the_step_in_bounded_time(
    setup: tuple[Path, dict[str, str]],
) -> None:
    config, env = setup
    assert run_cli("prepare", "-c", str(config), env=env).returncode == 0
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts connections; nobody ever reads or answers
        port = silent.getsockname()[1]
        start = time.monotonic()
        proc = run_cli(
            "train",
            "-c",
            str(config),
            env={
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
            },
            timeout=120,
        )
        took = time.monotonic() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"MLflow tracking store http://127.0.0.1:{port} is unreachable" in proc.stderr
    assert took < 60
    assert not (config.parent / "data" / "tiny" / "model" / "model.pt").exists()


def test_a_new_sqlite_store_appears_whole_and_an_existing_one_is_kept(tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    code = (
        "from recsys.serving.mlflow_store import connect; "
        "c = connect(); c.create_experiment('kept') if len(__import__('sys').argv) > 1 else None"
    )
    made = subprocess.run(
        [sys.executable, "-c", code, "x"], env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # no temporary left
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db) as conn:  # the second connect used the store, did not remake it
        names = {row[0] for row in conn.execute("select name from experiments")}
    assert "kept" in names
