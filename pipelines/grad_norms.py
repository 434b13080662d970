"""The vanishing gradient as the train step and compare-cells show it: per epoch, the mean norm
of ∂loss_t/∂h_(t-j) at each lag j that a ``train.bptt`` window measured (recsys/training/bptt.py),
as MLflow metrics and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recsys.core.plots import plot_grad_norms
from recsys.training.bptt import LAG_METRIC, LAG_PREFIX

GRAD_PLOT = "grad_norms.png"


def lag_norms(record: dict[str, Any]) -> list[float]:
    """An epoch record's norms by lag (empty for a run without a window)."""
    lags = sum(1 for k in record if k.startswith(LAG_PREFIX))
    return [float(record[LAG_METRIC.format(j)]) for j in range(lags)]


def is_lag_metric(key: str) -> bool:
    return key.startswith(LAG_PREFIX)


def write_grad_plot(history: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Plot each epoch's norms by lag; without a window, remove an older plot (so a run never
    logs another run's). Returns whether there is a plot."""
    lines = {f"epoch {r['epoch']}": lag_norms(r) for r in history if lag_norms(r)}
    if not lines:
        path.unlink(missing_ok=True)
        return False
    plot_grad_norms(lines, path, title)
    return True
