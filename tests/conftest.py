"""Shared fixtures: the real logs in ../shared/data, a private MLflow store, the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from recsys.serving.mlflow_store import QUIET_ENV

pytest.register_assert_rewrite("tests.helpers")  # its asserts report values, as in tests

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()

# MLflow's quiet environment, plus no progress lines and no warnings in subprocess output
QUIET = {**QUIET_ENV, "RECSYS_QUIET": "1", "PYTHONWARNINGS": "ignore"}
for _k, _v in QUIET.items():
    os.environ.setdefault(_k, _v)


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """Skip a test that needs what this machine lacks; in CI, which must have it, fail."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(reason)


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data; skip without it, except in CI where its absence fails."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        skip_or_fail_in_ci(f"shared data not available: {path}")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    """mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI; one test's store must not be the
    next test's registry (the CLI children inherit the environment). Before any fixture."""
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store + artifact folder for one test."""
    uri = f"sqlite:///{tmp_path / 'mlops' / 'mlflow.db'}"
    (tmp_path / "mlops").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_config(workdir: Path, name: str = "tiny", **sections: Any) -> dict[str, Any]:
    """A synthetic-log config small enough for a whole pipeline in seconds."""
    config: dict[str, Any] = {
        "name": name,
        "workdir": str(workdir),
        "data": {
            "source": {
                "format": "synthetic",
                "synthetic": {
                    "seed": 3,
                    "n_items": 400,
                    "n_sessions": 3000,
                    "n_intents": 10,
                    "days": 10,
                },
            },
            "preparation": {"test_days": 1},
        },
        "model": {"layers": [32]},
        "train": {
            "batch_size": 32,
            "epochs": 2,
            "n_sample": 64,
            "sample_store_size": 20000,
            "learning_rate": 0.1,
            "logq": 1.0,
        },
        "evaluation": {
            "batch_size": 256,
            "baselines": {"pop": {"kind": "pop"}, "sr": {"kind": "sr"}},
        },
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``recsys`` as a real subprocess (the console script's module), capturing output."""
    full_env = {**os.environ, **QUIET, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small GRU4Rec trained on the RSC15 sample, shared by the serving and scoring tests."""
    from tests.helpers import train_rsc  # imported here: tests.helpers imports this module

    return train_rsc(tmp_path_factory.mktemp("rsc"))
