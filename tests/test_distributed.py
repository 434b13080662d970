"""Data-parallel training (recsys/training/distributed.py): 2 gloo processes on CPU keep
bit-identical replicas, rank 0 writes the model, a resumed run equals an uninterrupted one,
and bad settings are one line before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys.config import ModelConfig
from recsys.core.errors import RecsysError
from recsys.data.batching import session_arrays
from recsys.model.artifact import TrainedModel
from recsys.training.distributed import session_share
from recsys.training.launch import DUMP_ENV, train_data_parallel
from tests.conftest import run_cli, tiny_config, write_config
from tests.helpers import deterministic_log, resumed_after_interrupt, small_train_config


def _flat(state: dict[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by its dotted name."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The tiny synthetic config, prepared once, with its own SQLite store."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = write_config(
        tmp / "tiny.yaml",
        tiny_config(tmp / "data", train={"epochs": 2, "max_steps": 25, "momentum": 0.1}),
    )
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    proc = run_cli("prepare", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    return config, env


def test_two_process_cli_run_keeps_replicas_bit_identical_and_rank0_writes_the_model(
    prepared_tiny: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    config, env = prepared_tiny
    proc = run_cli("train", "-c", str(config), "--nproc", "2", env={**env, DUMP_ENV: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    rank0 = _flat(torch.load(tmp_path / "rank0.pt", weights_only=True))
    rank1 = _flat(torch.load(tmp_path / "rank1.pt", weights_only=True))
    assert rank0.keys() == rank1.keys() and any(k.startswith("optimizer.rows") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = TrainedModel.load(config.parent / "data" / "tiny" / "model" / "model.pt")
    state = saved.network.state_dict()
    assert all(torch.equal(state[k], rank0[f"model.{k}"]) for k in state)
    meta = json.loads((config.parent / "data" / "tiny" / "model" / "meta.json").read_text())
    assert [r["processes"] for r in meta["history"]] == [2, 2]


def test_two_process_resume_equals_uninterrupted_and_early_stopping_is_rank0s(
    tmp_path: Path,
) -> None:
    log = deterministic_log(n_sessions=300)
    model_cfg = ModelConfig(layers=[16], dropout_hidden=0.2)
    cfg = small_train_config(epochs=3, momentum=0.2, nproc=2)
    # early stopping's calls, answered by rank 0 for every rank: stop after 3 of 4 epochs
    straight_run = train_data_parallel(
        log,
        30,
        model_cfg,
        cfg,
        epochs=4,
        validate=lambda model: float(model.item_bias.detach().sum()),
        stop=lambda history: len(history) == 3,
    )
    assert len(straight_run.history) == 3
    assert all(isinstance(r["valid_metric"], float) for r in straight_run.history)
    straight = straight_run.model.state_dict()

    ckpt = tmp_path / "ckpt"
    resumed = resumed_after_interrupt(train_data_parallel, ckpt, 2, log, 30, model_cfg, cfg)
    assert resumed.resumed_from == 2 and len(resumed.history) == 3
    assert all(torch.equal(straight[k], resumed.model.state_dict()[k]) for k in straight)
    assert resumed.history[-1]["processes"] == 2


def test_each_session_goes_to_exactly_one_rank() -> None:
    log = deterministic_log(n_sessions=50)
    data = session_arrays(log)
    shares = [session_share(data, r, 3) for r in range(3)]
    assert sum(s.n_sessions for s in shares) == data.n_sessions
    assert sum(s.n_events for s in shares) == data.n_events
    assert [s.session(0).tolist() for s in shares] == [data.session(k).tolist() for k in range(3)]
    assert shares[1].session(1).tolist() == data.session(4).tolist()


def test_more_processes_than_slots_is_refused_before_any_process_starts() -> None:
    cfg = small_train_config(nproc=17)  # 16 slots
    with pytest.raises(RecsysError, match="17 processes but train.batch_size is 16"):
        train_data_parallel(deterministic_log(n_sessions=40), 30, ModelConfig(layers=[8]), cfg)


def test_nproc_below_one_is_a_usage_error() -> None:
    proc = run_cli("train", "--nproc", "0")
    assert proc.returncode == 2 and "--nproc" in proc.stderr and "Traceback" not in proc.stderr
