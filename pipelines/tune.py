"""The tune step: an Optuna study over the config's ``tune.space``, trained on train_tr and
scored on valid (never test), written as ``data/<name>/tuning/best.yaml``.

Each trial trains GRU4Rec for at most ``tune.max_epochs`` and scores valid after every epoch
with the evaluation harness; the pruner sees each epoch's value, and the trial's value is its
best epoch's. The study lives in an Optuna RDB storage (``pipelines/tune_study.py``), so a rerun
continues it and several workers can share one; each trial is a child of a ``tune`` MLflow run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import optuna
import polars as pl
from pydantic import ValidationError

from pipelines.prepare import run_prepare
from pipelines.tracking import TAG_DATA, TAG_STEP, Tracker, guard
from pipelines.train import best_epoch, stalled, validation_metric
from pipelines.tune_study import (
    VALUES_ATTR,
    WORKER_ATTR,
    default_storage,
    open_storage,
    open_study,
    write_outputs,
)
from recsys.config import Config
from recsys.config.tune import SearchParam, search_space
from recsys.core.errors import RecsysError
from recsys.data.schema import ITEMS_FILE, STATS_FILE, TRAIN_TR, VALID, split_file
from recsys.training.trainer import train_gru4rec

TAG_TRIAL = "recsys.trial"
TAG_TRIAL_STATE = "recsys.trial_state"  # COMPLETE, PRUNED or FAIL
TAG_STUDY = "recsys.study"


class TrialFailed(Exception):
    """A trial whose training failed (diverged): the study records it as FAIL and goes on."""


@dataclass(frozen=True)
class TuningData:
    """What a trial reads: train_tr, valid and the catalogue size; the test split is not here."""

    train_tr: pl.DataFrame
    valid: pl.DataFrame
    n_items: int
    fingerprint: str


def load_tuning_data(config: Config) -> TuningData:
    """Read only the splits tuning needs, so no trial can look at test."""
    directory = config.prepared_dir
    return TuningData(
        train_tr=pl.read_parquet(directory / split_file(TRAIN_TR)),
        valid=pl.read_parquet(directory / split_file(VALID)),
        n_items=pl.read_parquet(directory / ITEMS_FILE).height,
        fingerprint=json.loads((directory / STATS_FILE).read_text())["fingerprint"],
    )


def sample(trial: optuna.Trial, space: tuple[SearchParam, ...]) -> dict[str, Any]:
    """The trial's value of every key of the space (dotted key -> config value); a key whose
    ``when`` does not hold is not sampled and keeps the config's value."""
    sampled: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for p in space:
        if any(sampled.get(key) != option for key, option in p.when):
            continue
        if p.kind == "int":
            s: Any = trial.suggest_int(
                p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        elif p.kind == "float":
            s = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
        elif p.kind == "choice":
            s = trial.suggest_categorical(p.key, p.options)
        else:
            s = None
        sampled[p.key] = s
        values[p.key] = p.config_value(s)
    return values


def apply_values(config: Config, values: dict[str, Any], epochs: int) -> Config:
    """``config`` with the model/train keys set and ``epochs`` epochs, without early stopping."""
    updates: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in values.items():
        section, _, field = key.partition(".")
        updates[section][field] = value
    updates["train"] |= {"epochs": epochs, "early_stopping": None}
    try:
        model = type(config.model).model_validate(config.model.model_dump() | updates["model"])
        train = type(config.train).model_validate(config.train.model_dump() | updates["train"])
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise RecsysError(f"the trial's config is invalid: {where}: {problem['msg']}") from None
    return config.model_copy(update={"model": model, "train": train})


class Objective:
    """One trial: sample, train on train_tr, score valid after each epoch, report to the pruner."""

    def __init__(
        self,
        config: Config,
        data: TuningData,
        tracker: Tracker | None,
        worker: dict[str, Any],
        study_name: str,
    ) -> None:
        self.config = config
        self.data = data
        self.tracker = tracker
        self.worker = worker
        self.study_name = study_name
        self.space = search_space(config.tune, {"model": config.model, "train": config.train})

    def __call__(self, trial: optuna.Trial) -> float:
        tune = self.config.tune
        trial.set_user_attr(WORKER_ATTR, self.worker)
        values = sample(trial, self.space)
        trial.set_user_attr(VALUES_ATTR, values)
        history: list[dict[str, Any]] = []
        pruned = False

        def stop(so_far: list[dict[str, Any]]) -> bool:
            nonlocal pruned
            trial.report(so_far[-1]["valid_metric"], len(so_far))
            pruned = trial.should_prune()
            return pruned or (tune.patience is not None and stalled(so_far, tune.patience))

        start = time.perf_counter()
        error = None
        try:
            config = apply_values(self.config, values, tune.max_epochs)
            train_gru4rec(
                self.data.train_tr,
                self.data.n_items,
                config.model,
                config.train,
                on_epoch=history.append,
                validate=lambda model: validation_metric(model, self.data.valid, tune.target),
                stop=stop,
            )
        except RecsysError as err:
            config, error = self.config, str(err)
        seconds = time.perf_counter() - start
        best = best_epoch(history) if history else 0
        value = history[best - 1]["valid_metric"] if history else math.nan
        state = "FAIL" if error else "PRUNED" if pruned else "COMPLETE"
        trial.set_user_attr("best_epoch", best)
        trial.set_user_attr("epochs", len(history))
        trial.set_user_attr("seconds", round(seconds, 3))
        trial.set_user_attr("valid", [h["valid_metric"] for h in history])
        if self.tracker is not None:
            self._log(trial.number, config, history, state, seconds, best)
        shown = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        outcome = f"failed: {error}" if error else f"valid {tune.metric} {value:.4f}"
        print(
            f"trial {trial.number} {state.lower()}: {outcome} (best epoch {best} of "
            f"{len(history)}), {seconds:.1f}s; {shown}",
            flush=True,
        )
        if error:
            raise TrialFailed(error)
        if pruned:
            raise optuna.TrialPruned(f"below the median after epoch {len(history)}")
        return value

    def _log(
        self,
        number: int,
        config: Config,
        history: list[dict[str, Any]],
        state: str,
        seconds: float,
        best: int,
    ) -> None:
        """A child run of the tune run: the trial's config as params, valid metric per epoch."""
        assert self.tracker is not None
        child = copy.copy(self.tracker)  # shares the client and the parent run
        child.config = config
        valid = f"valid_{self.config.tune.metric}"
        with child.step(f"trial-{number}", ("model", "train")) as run:
            run.tags(
                {
                    TAG_STEP: "tune-trial",
                    TAG_TRIAL: str(number),
                    TAG_TRIAL_STATE: state,
                    TAG_STUDY: self.study_name,
                    TAG_DATA: self.data.fingerprint,
                }
            )
            for record in history:
                run.metrics(
                    {valid: record["valid_metric"], "loss": record["loss"]}
                    | {"events_per_second": record["events_per_second"]},
                    step=int(record["epoch"]),
                )
            best_value = history[best - 1]["valid_metric"] if history else math.nan
            run.metrics(
                {
                    f"best_{valid}": best_value,
                    "best_epoch": best,
                    "epochs": len(history),
                    "seconds": seconds,
                    "pruned": float(state == "PRUNED"),
                }
            )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace(" ", "")


def run_tune(
    config: Config,
    tracker: Tracker | None,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the config's study and write ``tuning/best.yaml``.

    Without ``trials`` the study grows until it has ``tune.n_trials`` finished trials (complete
    or pruned; workers sharing the storage stop together); ``trials`` adds that many instead.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported by us, one line each
    tune = config.tune
    url = storage or default_storage()
    rdb = open_storage(url)  # a bad URL fails before any work
    run_prepare(config, None)
    data = load_tuning_data(config)
    study, worker = open_study(config, rdb, url, data.fingerprint, shared=storage is not None)
    finished = _finished(study)
    grow = trials is None  # to the study's size, else `trials` more
    if trials is None:
        trials = max(0, tune.n_trials - finished)
    timeout = timeout if timeout is not None else tune.timeout_seconds
    print(
        f"study {study.study_name!r} in {url}: {finished} finished trials; running "
        f"{trials} more" + (f" (no new trial after {timeout:g}s)" if timeout else ""),
        flush=True,
    )
    objective = Objective(config, data, tracker, worker, study.study_name)
    if tracker is None:
        _optimize(study, objective, trials, timeout, tune.n_trials if grow else None)
        return write_outputs(config, study, url, None)
    with tracker.parent("tune") as run_id:
        with guard("tagging the tune run"):
            tracker.client.set_tag(run_id, TAG_STEP, "tune")
            tracker.client.set_tag(run_id, TAG_STUDY, study.study_name)
        _optimize(study, objective, trials, timeout, tune.n_trials if grow else None)
        return write_outputs(config, study, url, (tracker, run_id))


def _finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _optimize(
    study: optuna.Study,
    objective: Objective,
    trials: int,
    timeout: float | None,
    size: int | None,
) -> None:
    if trials <= 0:
        return
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # Workers sharing the study stop once it has tune.n_trials finished trials between them.
    callbacks = [] if size is None else [optuna.study.MaxTrialsCallback(size, states=states)]
    study.optimize(
        objective, n_trials=trials, timeout=timeout, catch=(TrialFailed,), callbacks=callbacks
    )
