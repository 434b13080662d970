"""Accuracy and wall time of a full GRU4Rec training on Diginetica, on any device.

``configs/diginetica.yaml``'s model and training settings (``train.device`` set by
``--device``), trained on the whole train split for the config's epochs and evaluated on the
test split with the config's cutoffs and tie rule: the numbers of ``make pipeline
CONFIG=configs/diginetica.yaml`` without MLflow around them, so a GPU machine that has only
torch can reproduce them. Opt-in (``recsys bench --only accuracy``): ~14 minutes on 2 cores.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.measure import peak_gpu_mib
from benchmarks.train import DIGINETICA_CONFIG, diginetica_config
from recsys.core.errors import RecsysError
from recsys.data.preparation import prepare_events
from recsys.data.sources import read_events
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.training.trainer import train_gru4rec


def bench_accuracy(
    quick: bool, device: str = "cpu", settings: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """``settings``: dotted config overrides (``{"train.matmul": "fp32"}``) for comparisons."""
    overrides: dict[str, Any] = {"train.device": device, **(settings or {})}
    if quick:
        overrides["train.epochs"] = 1
    cfg = diginetica_config(overrides)
    log = cfg.data.source.paths[0]
    if not log.exists():
        raise RecsysError(f"{log}: the accuracy benchmark needs the shared Diginetica log")
    data = prepare_events(read_events(cfg.data.source), cfg.data.preparation, str(log))

    def report(record: dict[str, Any]) -> None:
        print(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['seconds']:.1f}s, "
            f"{record['events_per_second']:,.0f} events/s",
            file=sys.stderr,
            flush=True,
        )

    trained = train_gru4rec(data.train, data.n_items, cfg.model, cfg.train, on_epoch=report)
    rec = GRU4RecScorer(trained.model)
    result = evaluate(
        rec,
        data.test,
        cutoffs=cfg.evaluation.cutoffs,
        ties=cfg.evaluation.ties,
        show_progress=False,
    )
    events = sum(r["events"] for r in trained.history)
    gpu = {}
    if trained.model.item_out.device.type == "cuda":
        gpu["peak_gpu_mib"] = peak_gpu_mib()
    return [
        {
            **gpu,
            "case": f"accuracy gru4rec diginetica, {len(trained.history)} epochs",
            "events_per_s": round(events / trained.seconds),
            "train_s": round(trained.seconds, 1),
            "evaluate_s": round(result.seconds, 1),
            "recall@20": round(result.metrics["recall@20"], 4),
            "mrr@20": round(result.metrics["mrr@20"], 4),
            "note": f"{DIGINETICA_CONFIG.name} on {device}, {trained.history[-1]['products']} products, "
            f"{result.predictions:,} test predictions, "
            f"epoch losses {[round(r['loss'], 4) for r in trained.history]}",
        }
    ]
