"""Plots written as PNG artifacts (training loss, the test leaderboard, Recall@K / MRR@K per model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.core.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


HIGHLIGHT, OTHERS, WINNER = "#1f77b4", "#b8bec6", "#d62728"


def plot_leaderboard(
    results: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    highlight: str = "gru4rec",
    title: str = "",
) -> None:
    """One bar per model and metric, best on top: the winner in red with its value in bold,
    models named ``highlight...`` in blue, the rest grey; readable at a glance."""
    plt = _pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.42 * n + 1.4))
    axes = [axes] if len(metrics) == 1 else list(axes)
    for metric, ax in zip(metrics, axes, strict=True):
        rows = sorted(results, key=lambda r: r[metric])  # barh draws bottom-up: best on top
        values = [r[metric] for r in rows]
        colors = [HIGHLIGHT if r["model"].startswith(highlight) else OTHERS for r in rows]
        colors[-1] = WINNER
        bars = ax.barh([r["model"] for r in rows], values, color=colors)
        for i, (bar, value) in enumerate(zip(bars, values, strict=True)):
            best = i == n - 1
            label = f" {value:.4f}" + ("  best" if best else "")
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                label,
                va="center",
                fontsize=8,
                fontweight="bold" if best else "normal",
            )
        name, _, k = metric.partition("@")
        ax.set_title(f"{'MRR' if name == 'mrr' else name.capitalize()}@{k}", fontsize=10)
        ax.set_xlim(0, max(values) * 1.3 if max(values) > 0 else 1)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_metrics(results: Sequence[dict[str, Any]], cutoffs: Sequence[int], path: Path) -> None:
    """Recall@K and MRR@K against K, one line per model (``gru4rec`` drawn thicker)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for metric, ax in zip(("recall", "mrr"), axes, strict=True):
        for row in results:
            ax.plot(
                cutoffs,
                [row[f"{metric}@{k}"] for k in cutoffs],
                marker="o",
                label=row["model"],
                linewidth=3 if row["model"] == "gru4rec" else 1.2,
                zorder=3 if row["model"] == "gru4rec" else 2,
            )
        ax.set_xlabel("K")
        ax.set_ylabel(f"{'Recall' if metric == 'recall' else 'MRR'}@K")
        ax.set_xticks(list(cutoffs))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
