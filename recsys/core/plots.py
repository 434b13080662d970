"""Plots written as PNG artifacts (training loss, the test leaderboard, Recall@K / MRR@K per model,
metrics by position in the session)."""

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


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write the PNG atomically (a reader never sees half a plot) and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_loss(history: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_grad_norms(lines: dict[str, Sequence[float]], path: Path, title: str = "") -> None:
    """The vanishing gradient: mean ‖∂loss_t/∂h_(t-j)‖ against the lag j, one line per run or
    epoch (``lines``: label -> norms at lags 0, 1, ...), on a log scale where all are positive."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    positive = True
    for label, norms in lines.items():
        ax.plot(range(len(norms)), list(norms), marker="o", label=label)
        positive = positive and all(n > 0 for n in norms)
    if positive and lines:
        ax.set_yscale("log")
    ax.set_xlabel("lag j (steps back from the loss)")
    ax.set_ylabel("mean ‖∂loss_t / ∂h_(t-j)‖")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


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
    _save(plt, fig, path)


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
    _save(plt, fig, path)


def plot_by_position(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    highlight: str = "gru4rec",
    title: str = "",
) -> None:
    """Each metric against the clicks seen before the prediction, one line per model.

    ``rows`` are by-position rows (``model``, ``position``, ``predictions``, metrics). At each
    position the best model's point is ringed in red, and the legend (best first over all
    positions, for that panel's metric) says at how many positions each model is best, so the winner and
    where it wins read at a glance; the tick labels carry each position's prediction count.
    """
    plt = _pyplot()
    positions = list(dict.fromkeys(r["position"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["position"]): r for r in rows}
    counts = {p: cell[(models[0], p)]["predictions"] for p in positions}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 5.1))
    axes = [axes] if len(metrics) == 1 else list(axes)
    x = list(range(len(positions)))
    for metric, ax in zip(metrics, axes, strict=True):
        values = {m: [cell[(m, p)][metric] for p in positions] for m in models}
        best = [max(models, key=lambda m: values[m][i]) for i in x]
        total = {
            m: sum(v * counts[p] for v, p in zip(values[m], positions, strict=True)) for m in models
        }
        for rank, m in enumerate(sorted(models, key=lambda m: -total[m])):
            wins = sum(b == m for b in best)
            ax.plot(
                x,
                values[m],
                marker="o",
                markersize=3.5,
                label=f"{m} (best at {wins}/{len(x)})",
                linewidth=2.8 if m.startswith(highlight) else 1.2,
                zorder=3 if m.startswith(highlight) else 2,
                color=HIGHLIGHT if m == highlight else f"C{rank % 9 + 1}",  # C0 is HIGHLIGHT
                linestyle="-" if rank < 9 else "--",
            )
        ax.scatter(
            x,
            [values[b][i] for i, b in enumerate(best)],
            s=90,
            facecolors="none",
            edgecolors=WINNER,
            linewidths=1.6,
            zorder=4,
            label="best at this position",
        )
        name, _, k = metric.partition("@")
        ax.set_title(
            f"{'MRR' if name == 'mrr' else name.capitalize()}@{k} by position", fontsize=10
        )
        ax.set_xticks(x)
        ax.set_xticklabels([f"{p}\n{counts[p]:,}" for p in positions], fontsize=7)
        ax.set_xlabel("clicks seen before the prediction (and predictions)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def plot_replay(rows: Sequence[dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    """A replay by day: each metric, warm update against cold retrain (on the days it ran),
    and the training seconds of both; ``rows`` have ``day`` and ``warm.<m>`` / ``cold.<m>``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.6 * (len(metrics) + 1), 3.4))
    days = [r["day"] for r in rows]
    for metric, ax in zip([*metrics, "seconds"], axes, strict=True):
        for kind, color in (("warm", HIGHLIGHT), ("cold", WINNER)):
            points = [(d, r[f"{kind}.{metric}"]) for d, r in zip(days, rows, strict=True)]
            points = [(d, v) for d, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, label=kind)
        name, _, k = metric.partition("@")
        label = {"recall": "Recall", "mrr": "MRR", "seconds": "training seconds"}.get(name, name)
        label += f"@{k}" if k else ""
        ax.set_title(f"{label} by day", fontsize=10)
        ax.set_xlabel("replayed day")
        ax.set_xticks(days)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path)
