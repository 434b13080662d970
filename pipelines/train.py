"""The train step: prepared dataset -> GRU4Rec model file, tracked in MLflow."""

from __future__ import annotations

from typing import Any

import polars as pl

from pipelines.cache import config_key, read_marker, step_key
from pipelines.grad_norms import GRAD_PLOT, is_lag_metric, write_grad_plot
from pipelines.system_metrics import SystemSampler
from pipelines.tracking import (
    TAG_CACHED,
    TAG_DATA,
    TAG_KERNELS,
    TAG_MODEL,
    TAG_PRODUCTS,
    StepRun,
    Tracker,
    find_logged_model,
    guard,
    split_inputs,
)
from pipelines.warm import base_key, lineage, load_base, train_warm
from recsys.config import Config
from recsys.core.atomic import write_json
from recsys.core.errors import RecsysError
from recsys.core.metrics import Metric, parse_metric
from recsys.core.plots import plot_loss
from recsys.core.progress import step
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.data.schema import TRAIN, TRAIN_TR, VALID
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.serving.mlflow_store import log_pyfunc
from recsys.training.launch import is_follower, train_data_parallel

META_FILE = "meta.json"
LOSS_PLOT = "loss.png"


def train_key(config: Config, data_fingerprint: str) -> str:
    """A model is of the model and train sections and of the prepared data."""
    return step_key(config_key(config, "model", "train"), data_fingerprint)


def with_nproc(config: Config, nproc: int | None) -> Config:
    """The config with ``--nproc`` in ``train.nproc`` (so the step's key has it)."""
    if nproc is None:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"nproc": nproc})})


def read_meta(config: Config, key: str | None = None) -> dict[str, Any] | None:
    """The trained model's ``meta.json`` (None without a model, or one of another ``key``)."""
    return read_marker(config.model_dir / META_FILE, key, needs=[config.model_file])


def trained_meta(config: Config, data: PreparedDataset) -> dict[str, Any]:
    """The meta of the model that later steps read; an error if there is none, or if it was
    trained on another preparation of the data (a re-prepare without a retrain)."""
    meta = read_meta(config)
    if meta is None:
        raise RecsysError(
            f"{config.model_file}: no trained model; run `recsys train --config ...` first"
        )
    if meta.get("data_fingerprint") != data.stats["fingerprint"]:
        raise RecsysError(
            f"{config.model_file}: trained on another preparation of the data "
            f"({meta.get('data_fingerprint')} vs {data.stats['fingerprint']}); "
            f"run `recsys train --config ...` again"
        )
    return meta


def validation_metric(model: GRU4Rec, valid: pl.DataFrame, metric: Metric) -> float:
    """``metric`` of ``model`` on the valid split, scored by the evaluation harness (every
    position, full catalogue) at the metric's own cut-off: what early stopping and tuning pick by."""
    result = evaluate(GRU4RecScorer(model), valid, cutoffs=[metric.k], show_progress=False)
    return result.metrics[str(metric)]


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The 1-based epoch with the best ``valid_metric`` (the first of equals)."""
    values = [h["valid_metric"] for h in history]
    return 1 + max(range(len(values)), key=values.__getitem__)


def stalled(history: list[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` epochs brought no gain over the best one."""
    return len(history) - best_epoch(history) >= patience


def _tune_epochs(config: Config, data: PreparedDataset) -> tuple[int, list[dict[str, Any]]]:
    """Early stopping: train on train_tr, measure the metric on valid after every epoch, stop
    after ``patience`` epochs without a gain, and return the best epoch count for the refit."""
    es = config.train.early_stopping
    assert es is not None
    metric = parse_metric(es.metric)  # checked when the config loaded; its own cut-off
    tuned = train_data_parallel(
        data.train_tr,
        data.n_items,
        config.model,
        config.train,
        validate=lambda model: validation_metric(model, data.valid, metric),
        stop=lambda history: stalled(history, es.patience),
    )
    return best_epoch(tuned.history), [{**r, "phase": "tune"} for r in tuned.history]


def run_train(
    config: Config, tracker: Tracker | None, force: bool = False, resume: bool = False
) -> dict[str, Any]:
    data = load_prepared(config.prepared_dir)
    fingerprint = data.stats["fingerprint"]
    key = train_key(config, fingerprint)
    if is_follower():  # a torchrun rank but 0: it trains beside rank 0, which logs and writes
        tracker = None
    base = load_base(config.train.warm_start, config) if config.train.warm_start else None
    if base is not None:  # the key names the base's weights, not only its name
        key = step_key(key, base_key(base))
    meta = None if force or resume else read_meta(config, key)
    if (
        meta is not None
        and config.evaluation.fusion.enabled
        and not config.valid_model_file.exists()
    ):
        meta = None  # the fusions choose their weights with a train_tr model: train it too
    cached = meta is not None
    tracking = config.tracking
    sampler = SystemSampler(
        tracking.system_metrics_interval, enabled=tracker is not None and tracking.system_metrics
    )
    if meta is None:
        with sampler:
            meta = _train(config, data, key, resume, base)
        if is_follower():
            return meta
    if tracker is not None:
        with tracker.step("train", ("model", "train")) as run:
            run.tags(
                {
                    TAG_DATA: fingerprint,
                    TAG_MODEL: meta["model_fingerprint"],
                    TAG_CACHED: str(cached).lower(),
                    TAG_PRODUCTS: meta["history"][-1].get("products", "fp32"),
                    TAG_KERNELS: meta["history"][-1].get("kernels", "torch"),
                }
            )
            for record in meta["history"]:
                run.metrics(
                    {
                        k: v
                        for k, v in record.items()
                        if k in ("loss", "events_per_second", "valid_metric", "seconds")
                        or is_lag_metric(k)
                    },
                    step=int(record["epoch"]),
                )
            run.metrics({"train_seconds": meta["seconds"], "epochs": meta["epochs"]})
            run.artifact(config.model_dir / META_FILE)
            run.artifact(config.model_dir / LOSS_PLOT)
            if (config.model_dir / GRAD_PLOT).exists():  # a train.bptt window measured it
                run.artifact(config.model_dir / GRAD_PLOT)
            run.inputs(split_inputs(config, data, train_splits(config)))
            _track_model(tracker, run, config, data, meta)  # takes the run's metrics so far
            run.series(sampler.samples)  # the run's, not the model's
    last = meta["history"][-1]
    status = "up to date, not retrained" if cached else f"trained in {meta['seconds']:.1f}s"
    print(
        f"model: {config.model_file} ({status}); {meta['epochs']} epochs, final loss "
        f"{last['loss']:.4f}, {last['events_per_second']:,.0f} events/s"
        + (f", {last['products']} products" if "products" in last else "")
        + (f", {last['kernels']} kernels" if "kernels" in last else "")
    )
    return meta


def train_splits(config: Config) -> list[tuple[str, str]]:
    """The splits the train step reads, with their MLflow dataset context."""
    splits = [(TRAIN, "training")]
    if config.train.early_stopping is not None or config.evaluation.fusion.enabled:
        splits.append((TRAIN_TR, "training"))  # the epoch count, the fusions' own model
    if config.train.early_stopping is not None:
        splits.append((VALID, "validation"))
    return splits


def _track_model(
    tracker: Tracker, run: StepRun, config: Config, data: PreparedDataset, meta: dict[str, Any]
) -> str:
    """The train run's logged model: the experiment's copy of this model file when there is
    one (a rerun), else logged now."""
    found = find_logged_model(tracker.client, tracker.experiment_id, meta["model_fingerprint"])
    if found is None:
        return log_model(config, data, meta)
    run.output(found.model_id)
    return str(found.model_id)


def log_model(config: Config, data: PreparedDataset, meta: dict[str, Any]) -> str:
    """Log the model file as an MLflow logged model in the active run; returns its id. Tagged
    with the model's and the data's fingerprints (how later steps find it); MLflow gives it
    the run's params (the config) and the metrics logged so far."""
    tags = {TAG_MODEL: meta["model_fingerprint"], TAG_DATA: data.stats["fingerprint"]}
    with guard("logging the model"):
        info = log_pyfunc(
            config.model_file,
            example_sessions(data),
            name=config.registered_model_name,
            tags=tags,
        )
    return str(info.model_id)


def example_sessions(data: PreparedDataset) -> list[list[Any]]:
    """Two test sessions' worth of ids (3 and 2 clicks): the logged model's input example."""
    items = data.test["item_id"].head(5).to_list()
    return [items[:3], items[3:5]]


def check_trainable(config: Config, data: PreparedDataset) -> None:
    """Settings that would train without a word but not as meant, refused before the work."""
    if config.train.n_sample > data.n_items:
        raise RecsysError(
            f"train.n_sample: {config.train.n_sample:,} negative samples per step, but the "
            f"catalogue has only {data.n_items:,} items; use at most {data.n_items:,} (0: none)"
        )
    if config.train.early_stopping is not None and data.stats.get("valid_predictions", 0) == 0:
        raise RecsysError(
            f"train.early_stopping: the valid split of {config.prepared_dir} has no predictions "
            f"to choose the epoch count on; lengthen data.preparation.test_days or remove "
            f"train.early_stopping"
        )


def _train(
    config: Config, data: PreparedDataset, key: str, resume: bool, base: TrainedModel | None
) -> dict[str, Any]:
    check_trainable(config, data)
    history: list[dict[str, Any]] = []
    epochs = config.train.epochs
    if config.train.early_stopping is not None:
        with step("train: tuning the epoch count on train_tr / valid"):
            epochs, history = _tune_epochs(config, data)
        print(
            f"early stopping: best {config.train.early_stopping.metric} on valid after {epochs} epochs"
        )
    if base is not None:  # pipelines/warm.py: the window, the index mapping, the lineage
        with step(f"train GRU4Rec warm from {config.train.warm_start}"):
            result, trained = train_warm(config, data, base, key, resume, epochs)
    else:
        with step(f"train GRU4Rec on {data.train.height:,} clicks"):
            result = train_data_parallel(
                data.train,
                data.n_items,
                config.model,
                config.train,
                checkpoint_dir=config.checkpoint_dir,
                resume=resume,
                epochs=epochs,
            )
        trained = TrainedModel(
            result.model,
            ItemIndex.from_table(data.items),
            config.name,
            data.stats["fingerprint"],
            result.optimizer,
            lineage(data.train, ""),
        )
    history += [{**r, "phase": "fit"} for r in result.history]
    follower = is_follower()  # its replica equals rank 0's, which writes the files
    model_fingerprint = "" if follower else trained.save(config.model_file)
    if config.evaluation.fusion.enabled:
        with step(f"train GRU4Rec on train_tr ({data.train_tr.height:,} clicks) for the fusions"):
            on_tr = train_data_parallel(
                data.train_tr, data.n_items, config.model, config.train, epochs=epochs
            )
        if not follower:
            TrainedModel(on_tr.model, trained.items, config.name, data.stats["fingerprint"]).save(
                config.valid_model_file
            )
    if follower:
        return {"history": history}
    meta = {
        "key": key,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": data.stats["fingerprint"],
        "epochs": epochs,
        "seconds": round(sum(r["seconds"] for r in history), 3),
        "history": history,
        "n_items": data.n_items,
    }
    plot_loss([r for r in history if r["phase"] == "fit"], config.model_dir / LOSS_PLOT)
    title = f"{config.name}: train.bptt {config.train.bptt}"
    write_grad_plot(
        [r for r in history if r["phase"] == "fit"], config.model_dir / GRAD_PLOT, title
    )
    write_json(config.model_dir / META_FILE, meta)
    return meta
