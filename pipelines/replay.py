"""``recsys replay``: daily retraining replayed over the last N days of the prepared log.

For each day d: the warm model is the previous day's model continued on the clicks before d
(``pipelines/replay_days.py``), evaluated on d's sessions and registered with the champion gate
under ``<registered name>-replay`` (the production name is left alone), its registry tags naming
its base version and its data window; every ``cold_every`` days a cold model trained on
everything before d is evaluated the same way. Each day is an MLflow child run of one parent
run, which logs the plot of the metrics and seconds by day and the mean of each.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipelines.prepare import run_prepare
from pipelines.register import _decide, _existing_version, _metric_tag
from pipelines.replay_days import (
    DAY,
    DayModel,
    clicks_between,
    day_starts,
    replay_log,
    score_day,
    sessions_starting,
    train_cold,
    train_warm_day,
    young_shares,
)
from pipelines.tracking import TAG_MODEL, StepRun, Tracker, guard
from pipelines.warm import WINDOW, time_text
from recsys.config import MODEL_FILE, Config
from recsys.core.atomic import write_json
from recsys.core.plots import plot_replay
from recsys.core.progress import step
from recsys.data.preparation import load_prepared
from recsys.serving.mlflow_store import log_pyfunc

SUMMARY_FILE = "replay.json"
PLOT_FILE = "replay.png"
TAG_BASE = "recsys.base_version"  # registry lineage: the version a warm model continued
TAG_WINDOW = "recsys.window"  # and the clicks it trained on (first/last event, ISO)
TAG_KIND = "recsys.replay"  # warm (the daily update) or seed (the first model)


def replay_name(config: Config) -> str:
    """The registered model the replay's daily versions go to."""
    return f"{config.registered_model_name}-replay"


def run_replay(
    config: Config, tracker: Tracker, days: int, cold_every: int, warm_epochs: int | None = None
) -> dict[str, Any]:
    """Replay ``days`` days; returns (and writes to ``replay/replay.json``) the rows by day.
    ``warm_epochs`` trains the daily update for other epochs than ``train.epochs`` (a day's
    window is small: many epochs over it fit the day and forget the history)."""
    train = (
        config.train
        if warm_epochs is None
        else config.train.model_copy(update={"epochs": warm_epochs})
    )
    warm_config = config.model_copy(update={"train": train})
    run_prepare(config, None)
    data = load_prepared(config.prepared_dir)
    log = replay_log(data)
    starts = day_starts(log, days)
    window = DAY * (config.train.window_days or 1)
    metric = config.registry.metric
    out = config.run_dir / "replay"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tracker.parent(f"replay-{config.name}") as parent_id:
        with step("replay: the first model, cold on everything before the first window"):
            model = train_cold(config, clicks_between(log, None, starts[0] - window))
        base_version = _register(
            config, tracker, model, None, metric, None, out / "seed" / MODEL_FILE
        )
        for i, start in enumerate(starts):
            label = f"day {i + 1}/{days} ({start.date()})"
            test = sessions_starting(log, start, start + DAY)
            with step(f"replay {label}: warm update"):
                clicks = clicks_between(log, start - window, start)
                model = train_warm_day(warm_config, model.model, clicks, base_version)
            row = _day_row(i + 1, start, log, test, model, config, "warm")
            cold = None
            if i % cold_every == 0:
                with step(f"replay {label}: cold retrain"):
                    cold = train_cold(config, clicks_between(log, None, start))
            row |= _day_row(i + 1, start, log, test, cold, config, "cold")
            with tracker.step(f"replay-day-{i + 1}", ("model", "train")) as run:
                run.metrics({k: v for k, v in row.items() if isinstance(v, float | int)})
                path = out / f"day-{i + 1}" / MODEL_FILE
                version = _register(config, tracker, model, base_version, metric, row, path)
                run.tags({TAG_BASE: base_version, TAG_WINDOW: model.model.lineage[WINDOW]})
                run.tags({"recsys.model_version": version})
            row["version"], row["base_version"] = version, base_version
            base_version = version
            rows.append(row)
            print(_describe(row, metric))
        summary = _summary(rows, config)
        write_json(out / SUMMARY_FILE, {"days": rows, "mean": summary})
        plot_replay(rows, [_recall(config), metric], out / PLOT_FILE)
        parent = StepRun(tracker.client, parent_id)
        parent.metrics(summary)
        parent.tags(
            {"recsys.days": str(days), "recsys.cold_every": str(cold_every)}
            | {"recsys.warm_epochs": str(train.epochs)}
        )
        parent.artifact(out / PLOT_FILE)
        parent.artifact(out / SUMMARY_FILE)
        parent.table(rows, "replay_days.json")
    print(f"replay: {out / SUMMARY_FILE}, {out / PLOT_FILE}; " + _mean_line(summary, metric))
    return {"days": rows, "mean": summary}


def _recall(config: Config) -> str:
    return f"recall@{max(config.evaluation.cutoffs)}"


def _day_row(
    day: int,
    start: datetime,
    log: Any,
    test: Any,
    model: DayModel | None,
    config: Config,
    kind: str,
) -> dict[str, Any]:
    """One model's columns of a day's row (None for a cold model not trained that day)."""
    row: dict[str, Any] = {}
    if kind == "warm":
        row = {"day": day, "start": time_text(start), "test_events": test.height}
        row |= young_shares(log, test)
    names = [f"{m}@{k}" for m in ("recall", "mrr") for k in config.evaluation.cutoffs]
    names += ["unknown_targets", "seconds", "clicks", "new_items"]
    if model is None:
        return row | {f"{kind}.{n}": None for n in names}
    scores = score_day(model.model, test, config)
    values = scores | {
        "seconds": model.seconds,
        "clicks": model.clicks,
        "new_items": model.new_items,
    }
    return row | {f"{kind}.{n}": values[n] for n in names}


def _register(
    config: Config,
    tracker: Tracker,
    model: DayModel,
    base_version: str | None,
    metric: str,
    row: dict[str, Any] | None,
    path: Any,
) -> str:
    """Save the model, log it in the active run and register it; the champion gate moves the
    alias for a warm model that beats the champion's tag (the seed only registers)."""
    import mlflow

    fingerprint = model.model.save(path)
    name = replay_name(config)
    client = tracker.client
    version = _existing_version(client, name, fingerprint)
    if version is None:
        tags = {
            TAG_MODEL: fingerprint,
            TAG_BASE: base_version or "none",
            TAG_WINDOW: model.model.lineage[WINDOW],
            TAG_KIND: "warm" if row is not None else "seed",
        }
        if row is not None:
            tags[_metric_tag(metric)] = str(row[f"warm.{metric}"])
        ids = list(model.model.items.ids)
        with guard("logging the replay's model"):  # in the active run: the day's, or the parent
            info = log_pyfunc(path, [ids[:3], ids[3:5]], name=name, tags={TAG_MODEL: fingerprint})
            version = mlflow.register_model(f"models:/{info.model_id}", name, tags=tags)
    if row is not None:
        decision, _ = _decide(client, name, version, metric, float(row[f"warm.{metric}"]), False)
        row["decision"] = decision
    return str(version.version)


def _summary(rows: list[dict[str, Any]], config: Config) -> dict[str, float]:
    """Means over the replayed days: warm over every day, and warm and cold over the days
    the cold model ran (the comparison), with the ratio of their seconds."""
    keys = [_recall(config), config.registry.metric, "seconds"]
    both = [r for r in rows if r.get(f"cold.{keys[0]}") is not None]
    out = {f"mean.warm.{k}": sum(r[f"warm.{k}"] for r in rows) / len(rows) for k in keys}
    if both:
        for kind in ("warm", "cold"):
            for k in keys:
                out[f"paired.{kind}.{k}"] = sum(r[f"{kind}.{k}"] for r in both) / len(both)
        out["paired.seconds_ratio"] = out["paired.warm.seconds"] / out["paired.cold.seconds"]
    out["mean.new_items"] = sum(r["warm.new_items"] for r in rows) / len(rows)
    return out


def _describe(row: dict[str, Any], metric: str) -> str:
    cold = row.get(f"cold.{metric}")
    versus = f"; cold {metric} {cold:.4f} in {row['cold.seconds']:.1f}s" if cold is not None else ""
    return (
        f"day {row['day']} ({row['start'][:10]}): warm {metric} {row[f'warm.{metric}']:.4f} in "
        f"{row['warm.seconds']:.1f}s, {row['warm.new_items']} new items, "
        f"{row['warm.unknown_targets']:.1%} unknown targets{versus}; "
        f"version {row['version']} ({row.get('decision', '')})"
    )


def _mean_line(summary: dict[str, float], metric: str) -> str:
    if "paired.seconds_ratio" not in summary:
        return f"mean warm {metric} {summary[f'mean.warm.{metric}']:.4f}"
    return (
        f"on the days with both: warm {metric} {summary[f'paired.warm.{metric}']:.4f} vs cold "
        f"{summary[f'paired.cold.{metric}']:.4f}; warm seconds "
        f"{summary['paired.seconds_ratio']:.1%} of cold"
    )
