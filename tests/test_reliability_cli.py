"""No traceback on any error path (issue #19): each case runs ``recsys`` as a subprocess and gets
one ``error:`` line naming the file, key or field, exit code 1, and no ``Traceback``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, run_cli, tiny_config, write_config


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def config_file(tmp_path: Path, **sections: Any) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "data", **sections))


def test_a_bug_is_reported_as_one_line_with_the_log_of_its_traceback(tmp_path: Path) -> None:
    """The guard on every command: an unexpected exception (planted in the prepare step) is
    one line that says it is a bug and names the log that holds its traceback."""
    log_dir = tmp_path / "logs"
    code = (
        "import sys; from pipelines.cli import main\n"
        "import pipelines.prepare as p\n"
        "def boom(*a, **k): raise ZeroDivisionError('planted')\n"
        "p.run_prepare = boom\n"
        "sys.argv = ['recsys', 'prepare', '-c', sys.argv[1]]\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(config_file(tmp_path))],
        cwd=ROOT,
        env={**os.environ, "RECSYS_LOG_DIR": str(log_dir), "RECSYS_QUIET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_error_line(proc)
    assert "internal error (a bug in recsys" in line and "ZeroDivisionError: planted" in line
    logs = list(log_dir.glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in line
    assert "Traceback" in logs[0].read_text() and "boom" in logs[0].read_text()


def test_a_config_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"name: tiny", b"name: tiny # caf\xe9"))
    line = one_error_line(run_cli("train", "--config", str(path)))
    assert "tiny.yaml: not UTF-8 text (byte 0xe9" in line


def test_empty_evaluation_cutoffs_are_a_config_error(tmp_path: Path) -> None:
    proc = run_cli("evaluate", "--config", str(config_file(tmp_path, evaluation={"cutoffs": []})))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "evaluation.cutoffs: List should have at least 1 item" in proc.stderr


def test_a_workdir_that_is_a_file_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    line = one_error_line(run_cli("prepare", "--config", str(config_file(tmp_path))))
    assert f"workdir {blocker}: {blocker} is a file, not a folder" in line


def test_an_unwritable_output_is_one_line_naming_the_path(tmp_path: Path) -> None:
    """/proc refuses new folders even to root (a chmod would not stop root)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(Path("/proc/self/recsys")))
    line = one_error_line(run_cli("prepare", "--config", str(config)))
    assert "/proc/self/recsys" in line


def test_a_prepared_path_that_is_a_file_is_an_error_not_moved_aside(tmp_path: Path) -> None:
    prepared = tmp_path / "data" / "tiny" / "prepared"
    prepared.parent.mkdir(parents=True)
    prepared.write_text("mine")
    line = one_error_line(run_cli("prepare", "--config", str(config_file(tmp_path))))
    assert str(prepared) in line and "is a file, not a folder" in line
    assert prepared.read_text() == "mine"


def test_stale_temporary_folders_of_a_killed_prepare_are_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "data" / "tiny"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs: the writer was killed
    stale = run_dir / f".prepared.{dead.pid}-abc.tmp"
    (stale / "x").mkdir(parents=True)
    live = run_dir / f".prepared.{os.getpid()}-def.tmp"  # this test's own PID: still running
    live.mkdir()
    proc = run_cli("prepare", "--config", str(config_file(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists()
    assert (run_dir / "prepared" / "stats.json").is_file()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny config prepared and trained (with its checkpoint), in a private store."""
    tmp = tmp_path_factory.mktemp("tiny")
    config = write_config(
        tmp / "tiny.yaml", tiny_config(tmp / "data", train={"epochs": 1, "max_steps": 30})
    )
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    for step in ("prepare", "train"):
        proc = run_cli(step, "--config", str(config), env=env)
        assert proc.returncode == 0, proc.stderr
    return config


def test_resume_from_a_truncated_checkpoint_names_the_file(
    trained_tiny: Path, mlflow_store: str
) -> None:
    checkpoint = trained_tiny.parent / "data" / "tiny" / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    line = one_error_line(run_cli("train", "--config", str(trained_tiny), "--resume"))
    assert f"{checkpoint}: the checkpoint is damaged" in line and "without --resume" in line


def test_a_model_file_with_a_wrong_tensor_shape_is_one_line(
    trained_tiny: Path, tmp_path: Path
) -> None:
    model = trained_tiny.parent / "data" / "tiny" / "model" / "model.pt"
    payload = torch.load(model, weights_only=True)
    name = next(iter(payload["state"]))
    payload["state"][name] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    line = one_error_line(run_cli("recommend", "--model", str(bad), "--items", "1,2"))
    assert f"{bad}: the model file is damaged" in line


def test_n_sample_above_the_catalogue_is_refused_before_training(
    trained_tiny: Path, tmp_path: Path, mlflow_store: str
) -> None:
    raw = tiny_config(trained_tiny.parent / "data", train={"n_sample": 100_000, "max_steps": 5})
    config = write_config(tmp_path / "tiny.yaml", raw)
    line = one_error_line(run_cli("train", "--config", str(config), "--force"))
    assert "train.n_sample: 100,000 negative samples per step" in line and "catalogue" in line


def test_an_unreachable_store_is_reported_before_training(trained_tiny: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket is closed
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    model = trained_tiny.parent / "data" / "tiny" / "model" / "model.pt"
    before = model.stat().st_mtime_ns
    proc = run_cli("train", "--config", str(trained_tiny), "--force", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"MLflow tracking store http://127.0.0.1:{port} is unreachable" in proc.stderr
    assert model.stat().st_mtime_ns == before  # nothing was trained


def test_recommend_from_another_folder_creates_no_store_and_names_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "recommend", "-m", "models:/x@champion", "-i", "1"],
        cwd=tmp_path,
        env={**env, "RECSYS_QUIET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_error_line(proc)
    assert f"no MLflow store at {tmp_path / 'mlops' / 'mlflow.db'}" in line
    assert not (tmp_path / "mlops").exists()


def test_serving_a_damaged_model_file_is_one_line_before_the_server_starts(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    line = one_error_line(run_cli("serve", "--model", str(bad), "--port", "1"))
    assert f"{bad}: not a loadable recsys model file" in line
