"""Plots written as PNG artifacts (training loss, Recall@K / MRR@K per model)."""

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


def plot_metrics(results: Sequence[dict[str, Any]], cutoffs: Sequence[int], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for metric, ax in zip(("recall", "mrr"), axes, strict=True):
        for row in results:
            ax.plot(
                cutoffs, [row[f"{metric}@{k}"] for k in cutoffs], marker="o", label=row["model"]
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
