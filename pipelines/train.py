"""The train step: prepared dataset -> GRU4Rec model file, tracked in MLflow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.tracking import TAG_CACHED, TAG_DATA, TAG_KERNELS, TAG_MODEL, TAG_PRODUCTS, Tracker
from recsys.config import Config
from recsys.core.atomic import write_json
from recsys.core.plots import plot_loss
from recsys.core.progress import step
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.data.schema import ITEM, SUPPORT
from recsys.evaluation.gru4rec import GRU4RecRecommender
from recsys.evaluation.harness import evaluate
from recsys.model.gru4rec import GRU4Rec
from recsys.training.trainer import train_gru4rec

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
LOSS_PLOT = "loss.png"


def model_path(config: Config) -> Path:
    return config.model_dir / MODEL_FILE


def train_key(config: Config, data_fingerprint: str) -> str:
    blob = f"{config.section_hash('model', 'train')}|{data_fingerprint}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(config: Config) -> dict[str, Any] | None:
    path = config.model_dir / META_FILE
    if not path.exists() or not model_path(config).exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _tune_epochs(config: Config, data: PreparedDataset) -> tuple[int, list[dict[str, Any]]]:
    """Early stopping: train on train_tr, measure the metric on valid after every epoch, stop
    after ``patience`` epochs without a gain, and return the best epoch count for the refit."""
    es = config.train.early_stopping
    assert es is not None
    k = int(es.metric.split("@")[1])

    def validate(model: GRU4Rec) -> float:
        rec = GRU4RecRecommender(data.n_items, model=model)
        return evaluate(rec, data.valid, cutoffs=[k], show_progress=False).metrics[es.metric]

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
    meta = read_meta(config)
    cached = not force and not resume and meta is not None and meta.get("key") == key
    if not cached:
        meta = _train(config, data, key, resume)
    assert meta is not None
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
        f"model: {model_path(config)} ({status}); {meta['epochs']} epochs, final loss "
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
    items = data.items.sort("item_idx")
    extra = {
        "item_ids": items[ITEM].to_list(),
        "support": items[SUPPORT].to_list(),
        "dataset": config.name,
        "data_fingerprint": data.stats["fingerprint"],
    }
    path = model_path(config)
    result.model.save(path, extra)
    model_fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
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
