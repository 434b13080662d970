"""The evaluate step's table and plot by position in the session (``by_position.csv`` / ``.png``).

The harness keeps each model's metrics per prefix length (1 .. 9 clicks seen, then >= 10); this
module lays them out as one table for every model and draws the MRR and Recall at the registry
metric's cut-off by position: where a model with memory of the session pulls ahead of the
ones without, and from how many clicks on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys.core.atomic import atomic_path
from recsys.core.metrics import METRICS, metric_name
from recsys.core.plots import plot_by_position
from recsys.evaluation.harness import EvaluationResult

BY_POSITION_CSV = "by_position.csv"
BY_POSITION_PLOT = "by_position.png"


def position_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """The result's by-position rows, each named by its model."""
    return [{"model": result.model, **row} for row in result.by_position]


def write_by_position(
    out: Path, results: dict[str, Any], k: int, title: str, missing_only: bool = False
) -> None:
    """Write the table (every model, every bucket, every metric at every cut-off) and the plot
    of MRR@k and Recall@k, each atomically; ``missing_only`` keeps the files already there."""
    rows = results.get("by_position") or []
    if not rows:  # no predictions: no table, and none left from an earlier evaluation
        if not missing_only:
            for name in (BY_POSITION_CSV, BY_POSITION_PLOT):
                (out / name).unlink(missing_ok=True)
        return
    if not (missing_only and (out / BY_POSITION_CSV).exists()):
        columns = ["model", "position", "predictions"]
        columns += [metric_name(m, c) for m in METRICS for c in results["cutoffs"]]
        with atomic_path(out / BY_POSITION_CSV) as tmp:
            pl.DataFrame([{c: r.get(c) for c in columns} for r in rows]).write_csv(tmp)
    if not (missing_only and (out / BY_POSITION_PLOT).exists()):
        metrics = [metric_name("mrr", k), metric_name("recall", k)]
        plot_by_position(rows, metrics, out / BY_POSITION_PLOT, title=title)
