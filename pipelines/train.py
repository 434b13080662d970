"""The train step: prepared dataset -> GRU4Rec model file, tracked in MLflow."""

from __future__ import annotations

from typing import Any

from pipelines.cache import config_key, read_marker, step_key
from pipelines.tracking import TAG_CACHED, TAG_DATA, TAG_KERNELS, TAG_MODEL, TAG_PRODUCTS, Tracker
from recsys.config import Config
from recsys.core.atomic import write_json
from recsys.core.metrics import parse_metric
from recsys.core.plots import plot_loss
from recsys.core.progress import step
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.training.trainer import train_gru4rec

META_FILE = "meta.json"
LOSS_PLOT = "loss.png"


def train_key(config: Config, data_fingerprint: str) -> str:
    """A model is of the model and train sections and of the prepared data."""
    return step_key(config_key(config, "model", "train"), data_fingerprint)


def read_meta(config: Config, key: str | None = None) -> dict[str, Any] | None:
    """The trained model's ``meta.json`` (None without a model, or one of another ``key``)."""
    return read_marker(config.model_dir / META_FILE, key, needs=[config.model_file])


def _tune_epochs(config: Config, data: PreparedDataset) -> tuple[int, list[dict[str, Any]]]:
    """Early stopping: train on train_tr, measure the metric on valid after every epoch, stop
    after ``patience`` epochs without a gain, and return the best epoch count for the refit."""
    es = config.train.early_stopping
    assert es is not None
    metric = parse_metric(es.metric)  # checked when the config loaded; its own cut-off

    def validate(model: GRU4Rec) -> float:
        rec = GRU4RecScorer(model)
        result = evaluate(rec, data.valid, cutoffs=[metric.k], show_progress=False)
        return result.metrics[str(metric)]

    tuned = train_gru4rec(
        data.train_tr,
        data.n_items,
        config.model,
        config.train,
        validate=validate,
        stop=lambda history: _stalled(history, es.patience),
    )
    values = [r["valid_metric"] for r in tuned.history]
    best_epoch = 1 + max(range(len(values)), key=values.__getitem__)
    return best_epoch, [{**r, "phase": "tune"} for r in tuned.history]


def _stalled(history: list[dict[str, Any]], patience: int) -> bool:
    values = [h["valid_metric"] for h in history]
    best_at = max(range(len(values)), key=values.__getitem__)
    return len(values) - 1 - best_at >= patience


def run_train(
    config: Config, tracker: Tracker | None, force: bool = False, resume: bool = False
) -> dict[str, Any]:
    data = load_prepared(config.prepared_dir)
    fingerprint = data.stats["fingerprint"]
    key = train_key(config, fingerprint)
    meta = None if force or resume else read_meta(config, key)
    cached = meta is not None
    if meta is None:
        meta = _train(config, data, key, resume)
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
                    },
                    step=int(record["epoch"]),
                )
            run.metrics({"train_seconds": meta["seconds"], "epochs": meta["epochs"]})
            run.artifact(config.model_dir / META_FILE)
            run.artifact(config.model_dir / LOSS_PLOT)
    last = meta["history"][-1]
    status = "up to date, not retrained" if cached else f"trained in {meta['seconds']:.1f}s"
    print(
        f"model: {config.model_file} ({status}); {meta['epochs']} epochs, final loss "
        f"{last['loss']:.4f}, {last['events_per_second']:,.0f} events/s"
        + (f", {last['products']} products" if "products" in last else "")
        + (f", {last['kernels']} kernels" if "kernels" in last else "")
    )
    return meta


def _train(config: Config, data: PreparedDataset, key: str, resume: bool) -> dict[str, Any]:
    history: list[dict[str, Any]] = []
    epochs = config.train.epochs
    if config.train.early_stopping is not None:
        with step("train: tuning the epoch count on train_tr / valid"):
            epochs, history = _tune_epochs(config, data)
        print(
            f"early stopping: best {config.train.early_stopping.metric} on valid after {epochs} epochs"
        )
    with step(f"train GRU4Rec on {data.train.height:,} clicks"):
        result = train_gru4rec(
            data.train,
            data.n_items,
            config.model,
            config.train,
            checkpoint_dir=config.checkpoint_dir,
            resume=resume,
            epochs=epochs,
        )
    history += [{**r, "phase": "fit"} for r in result.history]
    trained = TrainedModel(
        result.model, ItemIndex.from_table(data.items), config.name, data.stats["fingerprint"]
    )
    model_fingerprint = trained.save(config.model_file)
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
    write_json(config.model_dir / META_FILE, meta)
    return meta
