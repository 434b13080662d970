"""Helpers shared by several test modules: small training logs and configs, the RSC15-trained
model the serving and scoring tests share, and the comparison of two recommendations.

They live here, not in a test module, so that no test module imports another one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipelines.prepare import prepare
from recsys.config import Config, TrainConfig, config_from_dict
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.data.schema import ITEM, SESSION
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.serving.recommender import Recommendation
from recsys.training.trainer import CHECKPOINT, TrainResult, train_gru4rec
from tests.conftest import shared_path, tiny_config

# --- a log a model must learn, and a training config small enough for it -------------------


def deterministic_log(n_items: int = 30, n_sessions: int = 600, seed: int = 0) -> pl.DataFrame:
    """Every item has exactly one successor: (i * 7 + 3) mod n. A model must learn it."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        item = int(rng.integers(n_items))
        for t in range(int(rng.integers(2, 8))):
            rows.append((s, item, s * 100 + t))
            item = (item * 7 + 3) % n_items
    frame = pl.DataFrame(rows, schema=["session_id", "item_idx", "t"], orient="row")
    return frame.with_columns(
        pl.from_epoch("t", "s").dt.replace_time_zone("UTC").alias("timestamp")
    )


def small_train_config(**kw: object) -> TrainConfig:
    base = {
        "batch_size": 16,
        "epochs": 1,
        "n_sample": 16,
        "sample_store_size": 1600,
        "learning_rate": 0.1,
    }
    return TrainConfig.model_validate(base | kw)


# --- a small GRU4Rec trained on the RSC15 100k sample (the `trained` fixture) -----------------

RSC = "yoochoose-rsc15-100k"


def rsc_config(workdir: Path) -> Config:
    """The RSC15 100k sample (train_full + test, time split on the last day), tiny model."""
    folder = shared_path(RSC)
    paths = [
        str(folder / "yoochoose-clicks-100k_train_full.txt"),
        str(folder / "yoochoose-clicks-100k_test.txt"),
    ]
    return config_from_dict(
        tiny_config(
            workdir,
            name="rsc",
            data={"source": {"format": "gru4rec_tsv", "path": paths}},
            train={"epochs": 1, "max_steps": 300, "threads": 1},
        )
    )


def train_rsc(workdir: Path) -> tuple[PreparedDataset, Path]:
    """Prepare + train through the library; save the model file the way `recsys train` does."""
    config = rsc_config(workdir)
    prepare(config)
    data = load_prepared(config.prepared_dir)
    result = train_gru4rec(data.train, data.n_items, config.model, config.train)
    path = workdir / "model" / "model.pt"
    TrainedModel(result.model, ItemIndex.from_table(data.items)).save(path)
    return data, path


def real_sessions(data: PreparedDataset, n: int) -> list[list[int]]:
    """The first n test sessions with at least two clicks, as original item ids."""
    grouped = data.test.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM))
    return [s for s in grouped[ITEM].to_list() if len(s) >= 2][:n]


def assert_same(a: Recommendation, b: Recommendation, atol: float = 0.0) -> None:
    """Same ranking and scores; with ``atol`` items whose scores are that close may swap."""
    assert (a.unknown, a.fallback) == (b.unknown, b.fallback)
    if atol == 0.0:
        assert a.items == b.items
        assert a.scores == b.scores
        return
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=atol)
    cut = a.scores[-1] + atol  # above the last score plus the tolerance, order is certain
    assert [i for i, s in zip(a.items, a.scores, strict=True) if s > cut] == [
        i for i, s in zip(b.items, b.scores, strict=True) if s > cut
    ]


class Interrupt(Exception):
    """Raised from an epoch callback: a run stopped after an epoch, as a kill would."""


def resumed_after_interrupt(
    train: Callable[..., TrainResult], checkpoint_dir: Path, after: int, *args: Any
) -> TrainResult:
    """``train(*args)`` stopped once epoch ``after`` is checkpointed, then resumed from that
    checkpoint: what a resume test compares with an uninterrupted run."""

    def stop(record: dict[str, object]) -> None:
        if record["epoch"] == after:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(*args, checkpoint_dir=checkpoint_dir, on_epoch=stop)
    assert (checkpoint_dir / CHECKPOINT).exists()
    return train(*args, checkpoint_dir=checkpoint_dir, resume=True)
