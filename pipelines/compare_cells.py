"""``recsys compare-cells``: what a recurrent network's memory buys, measured in one harness.

It trains one model per variant with the config's other settings on the config's prepared
data: every cell ``model.cell`` allows (read from the config, so new cells join), and for the
GRU and the LSTM also a longer BPTT window (``WINDOW``, fixed here, never chosen on test). Each
is evaluated on test by the evaluate step's harness and settings (every position, full
catalogue), the table and plots go to ``data/<name>/cells/`` and to MLflow: a parent run
``compare-cells-<name>`` with the table (log_table + CSV), MRR/Recall by position per variant
and the gradient norm by lag, and a child run per variant whose params are its own config. It
is a report, not a selection: nothing is chosen from it. A variant already measured with the
same config, evaluation and data is read back instead of trained again (``--force`` redoes it).
"""

from __future__ import annotations

import time
import typing
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.by_position import BY_POSITION_CSV, BY_POSITION_PLOT, write_by_position
from pipelines.cache import config_key, read_marker, step_key
from pipelines.evaluate import harness_options
from pipelines.grad_norms import is_lag_metric, lag_norms
from pipelines.report import format_table
from pipelines.tracking import TAG_CACHED, TAG_DATA, StepRun, Tracker, split_inputs
from pipelines.train import check_trainable
from recsys.config import Config, ModelConfig
from recsys.core.atomic import atomic_path, write_json
from recsys.core.metrics import metric_name, parse_metric
from recsys.core.plots import plot_grad_norms
from recsys.core.progress import step
from recsys.data.preparation import PreparedDataset, load_prepared
from recsys.data.schema import TEST, TRAIN
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.training.trainer import train_gru4rec

WINDOW = 5  # the longer truncated-BPTT window compared with GRU4Rec's 1
WINDOW_CELLS = ("gru", "lstm")  # the cells also trained with it
TABLE_CSV, TABLE_JSON = "cells.csv", "cells_table.json"
GRAD_PLOT = "grad_norms_by_cell.png"
SHOWN_POSITIONS = ("1", "2", "3", "5", ">=10")  # the terminal's; the CSV and MLflow hold all


def cells() -> list[str]:
    """The cells ``model.cell`` allows (only the GRU where the config has no such setting)."""
    field = ModelConfig.model_fields.get("cell")
    return list(typing.get_args(field.annotation)) if field is not None else ["gru"]


def variants(config: Config) -> list[tuple[str, Config]]:
    """(name, config) per variant: every cell at bptt 1, the window cells also at ``WINDOW``."""
    out = []
    for cell in cells():
        for bptt in (1, WINDOW) if cell in WINDOW_CELLS else (1,):
            model = config.model.model_copy(update={"cell": cell})  # whatever the config's
            train = config.train.model_copy(update={"bptt": bptt, "early_stopping": None})
            name = cell if bptt == 1 else f"{cell}-bptt{bptt}"
            out.append((name, config.model_copy(update={"model": model, "train": train})))
    return out


def run_compare_cells(
    config: Config, tracker: Tracker | None, force: bool = False
) -> list[dict[str, Any]]:
    """Train, evaluate and report every variant; returns the table's rows."""
    data = load_prepared(config.prepared_dir)
    check_trainable(config, data)
    out = config.run_dir / "cells"
    k = parse_metric(config.registry.metric).k
    done = []
    for name, vcfg in variants(config):
        key = step_key(config_key(vcfg, "model", "train", "evaluation"), data.stats["fingerprint"])
        found = None if force else read_marker(out / f"{name}.json", key)
        done.append((name, vcfg, found or _measure(name, vcfg, data, key, out), found is not None))
    rows = [_row(name, vcfg, r, k) for name, vcfg, r, _ in done]
    positions = [p for _, _, r, _ in done for p in r["by_position"]]
    results = {"by_position": positions, "cutoffs": config.evaluation.cutoffs}
    title = f"{config.name}: test by clicks seen, one harness, {config.evaluation.ties} ties"
    write_by_position(out, results, k, title)
    with atomic_path(out / TABLE_CSV) as tmp:
        pl.DataFrame(rows).write_csv(tmp)
    grads = {name: lag_norms(r["history"][-1]) for name, _, r, _ in done}
    grads = {n: g for n, g in grads.items() if g}
    if grads:
        plot_grad_norms(grads, out / GRAD_PLOT, f"{config.name}: last epoch, by lag")
    if tracker is not None:
        _track(config, tracker, data, done, rows, out, bool(grads))
    columns = ["variant", metric_name("recall", k), metric_name("mrr", k)]
    columns += [f"{metric_name('mrr', k)} after {p}" for p in SHOWN_POSITIONS]
    columns = [c for c in columns if c in rows[0]]  # a bucket without predictions has no column
    columns += ["events_per_second", "parameters", "train_seconds"]
    print(format_table(rows, columns))
    print(f"table: {out / TABLE_CSV}; by position: {out / BY_POSITION_CSV}")
    return rows


def _measure(name: str, vcfg: Config, data: PreparedDataset, key: str, out: Path) -> dict[str, Any]:
    """Train the variant on train and evaluate it on test; its result file is its cache."""
    with step(f"compare-cells {name}: train on {data.train.height:,} clicks"):
        start = time.perf_counter()
        trained = train_gru4rec(data.train, data.n_items, vcfg.model, vcfg.train)
        seconds = time.perf_counter() - start
    result = evaluate(GRU4RecScorer(trained.model), data.test, name=name, **harness_options(vcfg))
    n_params = sum(p.numel() for p in trained.model.parameters())
    dense = sum(p.numel() for p in trained.model.dense_parameters())
    found = {
        "key": key,
        "metrics": result.as_dict(),
        "by_position": [{"model": name, **r} for r in result.by_position],
        "history": trained.history,
        "train_seconds": round(seconds, 3),
        "parameters": n_params,
        "recurrent_parameters": dense,
    }
    write_json(out / f"{name}.json", found)
    return found


def _row(name: str, vcfg: Config, found: dict[str, Any], k: int) -> dict[str, Any]:
    """One line of the table: the headline metrics, MRR@k by position, cost and size."""
    metrics, last = found["metrics"], found["history"][-1]
    mrr = metric_name("mrr", k)
    row: dict[str, Any] = {
        "variant": name,
        "cell": getattr(vcfg.model, "cell", "gru"),
        "bptt": vcfg.train.bptt,
        metric_name("recall", k): round(metrics[metric_name("recall", k)], 4),
        mrr: round(metrics[mrr], 4),
    }
    for p in found["by_position"]:
        row[f"{mrr} after {p['position']}"] = round(p[mrr], 4)
    row["events_per_second"] = round(last["events_per_second"])
    row["parameters"] = found["parameters"]
    row["recurrent_parameters"] = found["recurrent_parameters"]
    row["train_seconds"] = found["train_seconds"]
    for j, norm in enumerate(lag_norms(last)):
        row[f"grad_norm_lag_{j}"] = norm
    return row


def _track(
    config: Config,
    tracker: Tracker,
    data: PreparedDataset,
    done: list[tuple[str, Config, dict[str, Any], bool]],
    rows: list[dict[str, Any]],
    out: Path,
    grads: bool,
) -> None:
    """The parent run with the table and plots, a child run per variant (its own params)."""
    inputs = split_inputs(config, data, [(TRAIN, "training"), (TEST, "test")])
    with tracker.parent(f"compare-cells-{config.name}") as parent_id:
        for (name, vcfg, found, cached), row in zip(done, rows, strict=True):
            child = Tracker(vcfg)
            child.parent_id = parent_id
            with child.step(f"cell-{name}", ("model", "train", "evaluation")) as run:
                run.tags({TAG_DATA: data.stats["fingerprint"], TAG_CACHED: str(cached).lower()})
                for record in found["history"]:
                    run.metrics(_epoch_metrics(record), step=int(record["epoch"]))
                numbers = {c: v for c, v in row.items() if isinstance(v, int | float)}
                run.metrics({_metric(c): float(v) for c, v in numbers.items()})
                run.inputs(inputs)
        parent = StepRun(tracker.client, parent_id)
        parent.table(rows, TABLE_JSON)
        parent.artifact(out / TABLE_CSV)
        for name in (BY_POSITION_CSV, BY_POSITION_PLOT) + ((GRAD_PLOT,) if grads else ()):
            if (out / name).exists():
                parent.artifact(out / name)
        parent.inputs(inputs)


def _epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    keep = ("loss", "events_per_second", "seconds")
    return {k: float(v) for k, v in record.items() if k in keep or is_lag_metric(k)}


def _metric(column: str) -> str:
    """A table column as an MLflow metric name (no spaces, no '>' or '=')."""
    return column.replace(" after >=", ".pos_ge_").replace(" after ", ".pos_")
