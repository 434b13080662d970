"""The evaluate step: GRU4Rec and every configured baseline through one harness on test."""

from __future__ import annotations

import time
from typing import Any

import polars as pl

from pipelines.by_position import (
    BY_POSITION_CSV,
    BY_POSITION_PLOT,
    position_rows,
    write_by_position,
)
from pipelines.cache import config_key, read_marker, step_key
from pipelines.report import format_table
from pipelines.tracking import TAG_CACHED, TAG_DATA, Tracker, find_logged_model, split_inputs
from pipelines.train import trained_meta
from recsys.config import Config
from recsys.core.atomic import atomic_path, write_json
from recsys.core.metrics import metric_name, parse_metric
from recsys.core.plots import plot_leaderboard, plot_metrics
from recsys.core.progress import step
from recsys.data.preparation import load_prepared
from recsys.data.schema import TEST, TRAIN, TRAIN_TR, VALID
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import EvaluationResult, evaluate

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
METRICS_PLOT = "metrics.png"  # the leaderboard at the registry metric's cut-off
METRICS_AT_K_PLOT = "metrics_at_k.png"  # Recall@K and MRR@K over the cut-offs
RESULTS_TABLE = "results_table.json"  # MLflow table artifact: sortable in the UI
GRU4REC = "gru4rec"


def eval_key(config: Config, model_fingerprint: str, data_fingerprint: str) -> str:
    """An evaluation is of the evaluation section, the trained model and the prepared data."""
    return step_key(config_key(config, "evaluation"), model_fingerprint, data_fingerprint)


def read_results(config: Config, key: str | None = None) -> dict[str, Any] | None:
    """The evaluation's ``metrics.json`` (None without one, or one of another ``key``)."""
    return read_marker(config.evaluation_dir / METRICS_JSON, key)


def run_evaluate(config: Config, tracker: Tracker | None, force: bool = False) -> dict[str, Any]:
    data = load_prepared(config.prepared_dir)
    meta = trained_meta(config, data)
    key = eval_key(config, meta["model_fingerprint"], data.stats["fingerprint"])
    previous = None if force else read_results(config, key)
    if previous is not None and "by_position" not in previous:  # cached before the table existed
        previous = None
    cached = previous is not None
    results = previous if previous is not None else evaluate_dataset(config, data, key)
    draw_plots(config, results, missing_only=True)  # an evaluation cached by an older recsys
    if tracker is not None:
        with tracker.step("evaluate", ("evaluation",)) as run:
            run.tags({TAG_DATA: data.stats["fingerprint"], TAG_CACHED: str(cached).lower()})
            model = find_logged_model(
                tracker.client, tracker.experiment_id, meta["model_fingerprint"]
            )
            inputs = split_inputs(config, data, evaluate_splits(config))
            run.inputs(inputs, model_ids=[model.model_id] if model is not None else [])
            metrics: dict[str, float] = {}
            for row in results["rows"]:
                for k, v in row.items():
                    if isinstance(v, int | float) and k != "model":
                        metrics[f"{row['model']}.{k}"] = float(v)
            own = {k: v for k, v in metrics.items() if k.startswith(f"{GRU4REC}.")}
            linked = model is not None and any(
                m.key.startswith(f"{GRU4REC}.") for m in model.metrics
            )
            if model is not None and not linked:  # linked once, measured on the test dataset
                run.linked_metrics(own, model.model_id, dataset=inputs[0][0])
                metrics = {k: v for k, v in metrics.items() if k not in own}
            run.metrics(metrics)
            run.table(table_rows(results, config), RESULTS_TABLE)
            for name in (METRICS_JSON, METRICS_CSV, METRICS_PLOT, METRICS_AT_K_PLOT):
                run.artifact(config.evaluation_dir / name)
            for name in (BY_POSITION_CSV, BY_POSITION_PLOT):
                if (config.evaluation_dir / name).exists():  # absent only with no predictions
                    run.artifact(config.evaluation_dir / name)
    print(results_table(results, config))
    if (config.evaluation_dir / BY_POSITION_CSV).exists():
        print(f"by position in the session: {config.evaluation_dir / BY_POSITION_CSV}")
    return results


def harness_options(config: Config) -> dict[str, Any]:
    """The harness's settings from the evaluation section: every model of every step (evaluate,
    compare-cells) is measured with the same ones."""
    ev = config.evaluation
    return {
        "cutoffs": ev.cutoffs,
        "ties": ev.ties,
        "batch_size": ev.batch_size,
        "exclude_seen": ev.exclude_seen,
        "coverage_k": ev.coverage_k,
    }


def evaluate_dataset(config: Config, data: Any, key: str) -> dict[str, Any]:
    from recsys.evaluation.baselines import make_baseline

    ev = config.evaluation
    kwargs = harness_options(config)
    rows: list[dict[str, Any]] = []
    positions: list[dict[str, Any]] = []  # every model's rows by position in the session
    gru = GRU4RecScorer.from_file(config.model_file)
    result = evaluate(gru, data.test, name=GRU4REC, **kwargs)
    rows.append(_row(result, 0.0, positions))
    fitted: dict[str, Any] = {}
    for name, spec in ev.baselines.items():
        with step(f"baseline {name}: fit"):
            start = time.perf_counter()
            model = make_baseline(spec.kind, data.n_items, spec.params).fit(data.train)
            fit_seconds = time.perf_counter() - start
        fitted[name] = model
        rows.append(_row(evaluate(model, data.test, name=name, **kwargs), fit_seconds, positions))
    if ev.fusion.enabled:
        from pipelines.fusions import fusion_results

        for fused, chosen in fusion_results(config, data, gru, fitted, kwargs):
            rows.append(_row(fused, 0.0, positions) | chosen)
    results = {
        "key": key,
        "ties": ev.ties,
        "cutoffs": ev.cutoffs,
        "rows": rows,
        "by_position": positions,
    }
    out = config.evaluation_dir
    draw_plots(config, results)
    with atomic_path(out / METRICS_CSV) as tmp:
        pl.DataFrame(rows).write_csv(tmp)
    write_json(out / METRICS_JSON, results)  # written last: its key marks a complete evaluation
    return results


def table_rows(results: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    """The rows best first on the registry metric, columns as a reader wants them: the model,
    Recall, MRR, NDCG by cut-off, coverage, then counts and timings."""
    order = {"model": 0, "recall": 1, "mrr": 2, "ndcg": 3, "coverage": 4}

    def rank(key: str) -> tuple[int, int]:
        name, _, k = key.partition("@")
        return (order.get(name, 5), int(k) if k.isdigit() else 0)

    columns = sorted(dict.fromkeys(k for r in results["rows"] for k in r), key=rank)
    rows = sorted(results["rows"], key=lambda r: -r.get(config.registry.metric, 0.0))
    rounded = [{c: r.get(c) for c in columns} for r in rows]
    return [{c: round(v, 4) if isinstance(v, float) else v for c, v in r.items()} for r in rounded]


def evaluate_splits(config: Config) -> list[tuple[str, str]]:
    """The splits the evaluate step reads, with their MLflow dataset context (test first)."""
    splits = [(TEST, "test"), (TRAIN, "training")]  # the baselines are fitted on train
    if config.evaluation.fusion.enabled:  # weights chosen on valid with train_tr models
        splits += [(TRAIN_TR, "training"), (VALID, "validation")]
    return splits


def draw_plots(config: Config, results: dict[str, Any], missing_only: bool = False) -> None:
    """The leaderboard at the registry metric's cut-off, the curves over the cut-offs, and the
    table and plot by position in the session."""
    out = config.evaluation_dir
    k = parse_metric(config.registry.metric).k
    if not (missing_only and (out / METRICS_PLOT).exists()):
        title = f"{config.name}: test, full catalogue, {results['ties']} ties"
        gate = config.registry.metric
        metrics = list(dict.fromkeys([metric_name("recall", k), metric_name("mrr", k), gate]))
        plot_leaderboard(results["rows"], metrics, out / METRICS_PLOT, GRU4REC, title)
    if not (missing_only and (out / METRICS_AT_K_PLOT).exists()):
        plot_metrics(results["rows"], results["cutoffs"], out / METRICS_AT_K_PLOT)
    title = f"{config.name}: test by clicks seen, full catalogue, {results['ties']} ties"
    write_by_position(out, results, k, title, missing_only)


def _row(
    result: EvaluationResult, fit_seconds: float, positions: list[dict[str, Any]]
) -> dict[str, Any]:
    positions.extend(position_rows(result))
    row = result.as_dict()
    row["fit_seconds"] = round(fit_seconds, 3)
    return row


def results_table(results: dict[str, Any], config: Config) -> str:
    """The terminal's table: one line saying what was measured, then the models best first."""
    head, rows, columns = results_view(results, config)
    return head + "\n" + format_table(rows, columns)


def results_view(
    results: dict[str, Any], config: Config
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """What a results table shows, for the terminal and the pipeline run's description: the
    headline, the rows best first on the registry metric, the columns."""
    cutoffs = results["cutoffs"]
    shown = [metric_name(m, k) for m in ("recall", "mrr") for k in cutoffs if k in (5, 10, 20)]
    cov = metric_name("coverage", config.evaluation.coverage_k)
    columns = ["model", *shown, cov, "seconds"]
    rows = sorted(results["rows"], key=lambda r: -r.get(config.registry.metric, 0.0))
    first = results["rows"][0]
    head = (
        f"test: {first['predictions']:,} predictions in {first['sessions']:,} sessions, "
        f"full catalogue, {results['ties']} ties"
    )
    if first["skipped_sessions"] or first["unknown_events"]:
        head += (
            f"; {first['unknown_events']:,} clicks on unknown items skipped, "
            f"{first['skipped_sessions']:,} sessions left with fewer than 2 known clicks"
        )
    if any("weight" in r for r in rows):  # the fusions: weights chosen on valid
        columns.insert(-1, "weight")
        head += "; fusion weights chosen on valid"
    return head, rows, columns
