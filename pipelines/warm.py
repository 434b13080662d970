"""``recsys train --warm-start MODEL``: continue a model on the newest clicks of train.

The base is named as everywhere else (a file, a directory, ``runs:/`` or ``models:/``); the
window is the last ``train.window_days`` of the train split, or the clicks after the base
model's last event. The mapping of items and optimiser state is ``recsys.training.warm_start``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import Config
from recsys.core.errors import RecsysError
from recsys.core.fingerprint import digest
from recsys.data.preparation import PreparedDataset
from recsys.data.schema import ITEM_IDX, TIME
from recsys.data.splits import drop_short_sessions
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.serving.mlflow_store import load_model
from recsys.training.launch import launched_world
from recsys.training.trainer import TrainResult, train_gru4rec
from recsys.training.warm_start import WarmStart, check_compatible, merged_ids, warm_start

LAST_EVENT = "last_event"  # lineage keys of the model file
WINDOW = "window"
BASE = "base"


def load_base(uri: str, config: Config) -> TrainedModel:
    """The base model, checked against the config's network; one clear error otherwise."""
    if not uri.startswith(("models:/", "runs:/")) and not Path(uri).exists():
        raise RecsysError(f"warm start: {uri}: no such model file or directory")
    base = load_model(uri)
    check_compatible(base.network.config, config.model, uri)
    if base.optimizer is None:
        print(f"note: {uri} holds no optimiser state (an older file): Adagrad starts from zero")
    return base


def time_text(value: datetime) -> str:
    """A timestamp as the lineage keeps it: ISO 8601, UTC, milliseconds."""
    return value.isoformat(timespec="milliseconds")


def window_of(
    train: pl.DataFrame, base: TrainedModel, days: float | None, uri: str
) -> pl.DataFrame:
    """The clicks the warm start trains on: sessions cut to the window, at least two clicks."""
    if days is not None:
        start = train[TIME].max() - timedelta(days=days)  # type: ignore[operator]
        window = train.filter(pl.col(TIME) > start)
        said = f"the last {days:g} days of train"
    else:
        last = base.lineage.get(LAST_EVENT)
        if not last:
            raise RecsysError(
                f"warm start: {uri} does not record its last training event (a file from before "
                f"warm starts); set train.window_days"
            )
        window = train.filter(pl.col(TIME) > datetime.fromisoformat(last))
        said = f"the clicks after the base model's last event ({last})"
    window = drop_short_sessions(window, 2)
    if window.height == 0:
        raise RecsysError(
            f"warm start: {said} hold no session of two clicks to train on; set "
            f"train.window_days or train cold"
        )
    return window


def lineage(window: pl.DataFrame, base_name: str) -> dict[str, str]:
    """What the model file (and the registry) says the model saw: its window and its base."""
    first, last = window[TIME].min(), window[TIME].max()
    return {
        LAST_EVENT: time_text(last),  # type: ignore[arg-type]
        WINDOW: f"{time_text(first)}/{time_text(last)}",  # type: ignore[arg-type]
        BASE: base_name,
    }


def prepare_warm(
    base: TrainedModel, window: pl.DataFrame, today_ids: list[Any], config: Config, key: str
) -> tuple[list[Any], WarmStart]:
    """Today's item ids (today's index, then the base's items no longer seen) and the warm
    state for them; ``window``'s ``item_idx`` is in today's index."""
    ids = merged_ids(base.items.ids, today_ids)
    counts = np.bincount(window[ITEM_IDX].to_numpy(), minlength=len(ids))
    warm = warm_start(
        base.network,
        base.items.ids,
        base.items.support,
        base.optimizer,
        ids,
        torch.from_numpy(counts.astype(np.float64)),
        config.model,
        config.train.momentum,
        config.train.seed,
        key,
    )
    return ids, warm


def with_warm_start(config: Config, uri: str | None) -> Config:
    """The config with ``--warm-start`` in ``train.warm_start`` (so the step's key has it)."""
    if uri is None:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"warm_start": uri})})


def base_key(base: TrainedModel) -> str:
    """What the base is, for the train step's cache key: ``models:/...@champion`` names
    another model once the alias moves."""
    weights = base.network.item_out.detach().cpu().numpy().tobytes()
    text = f"{sorted(base.lineage.items())}|{base.data_fingerprint}"
    return digest([text.encode(), weights])


def train_warm(
    config: Config,
    data: PreparedDataset,
    base: TrainedModel,
    key: str,
    resume: bool,
    epochs: int,
) -> tuple[TrainResult, TrainedModel]:
    """The train step's warm start: the window of train, today's index plus the base's other
    items, the base's state; the model file records its window and its base."""
    uri = str(config.train.warm_start)
    if config.train.early_stopping is not None:
        raise RecsysError(
            "train.early_stopping with a warm start: the epoch count is chosen on a cold "
            "train_tr model; remove one of the two"
        )
    if config.evaluation.fusion.enabled or config.train.nproc > 1 or launched_world() is not None:
        raise RecsysError(
            "a warm start trains in one process and without evaluation.fusion (its rows are "
            "fitted on a cold train_tr model): set train.nproc: 1, remove evaluation.fusion, "
            "and start it without torchrun"
        )
    window = window_of(data.train, base, config.train.window_days, uri)
    ids, warm = prepare_warm(base, window, list(ItemIndex.from_table(data.items).ids), config, key)
    result = train_gru4rec(
        window,
        len(ids),
        config.model,
        config.train,
        checkpoint_dir=config.checkpoint_dir,
        resume=resume,
        epochs=epochs,
        warm=warm,
    )
    print(
        f"warm start from {uri}: {window.height:,} clicks, {warm.new_items:,} new items, "
        f"{len(ids) - data.n_items:,} items of the base kept beyond the data's"
    )
    trained = TrainedModel(
        result.model,
        ItemIndex.of(ids, warm.support.tolist()),
        config.name,
        data.stats["fingerprint"],
        result.optimizer,
        lineage(window, uri),
    )
    return result, trained
