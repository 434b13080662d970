"""Evaluation throughput on the Diginetica test split (60,858 predictions over 43,097 items).

GRU4Rec (512 units) with the certified fast exact ranking and with plain fp32 scoring, and every
baseline (fit + evaluation). The GRU4Rec model is ``benchmarks.train.bench_model``'s (the trained
Diginetica model when present, else a briefly trained one; said in the note).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.train import bench_model, load_train
from recsys.config import BASELINE_KINDS
from recsys.evaluation.baselines import make_baseline
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate


def bench_evaluate(quick: bool) -> list[dict[str, Any]]:
    dataset, origin = load_train()
    test = dataset.test.head(8000) if quick else dataset.test
    model, which = bench_model(dataset)
    rows: list[dict[str, Any]] = []
    rec = GRU4RecScorer(model)
    for fast in (True, False):
        rec.fast_ranking = fast
        result = evaluate(rec, test, show_progress=False)
        rows.append(
            {
                "case": f"evaluate gru4rec ({'certified bf16 pass + fp32 check' if fast else 'full fp32'})",
                "events_per_s": round(result.events_per_second),
                "seconds": round(result.seconds, 2),
                "recall@20": round(result.metrics["recall@20"], 4),
                "mrr@20": round(result.metrics["mrr@20"], 4),
                "note": f"{origin}, {result.predictions:,} predictions, {which}",
            }
        )
    for kind in BASELINE_KINDS:
        start = time.perf_counter()
        baseline = make_baseline(kind, dataset.n_items, {}).fit(dataset.train)
        fit = time.perf_counter() - start
        result = evaluate(baseline, test, show_progress=False)
        rows.append(
            {
                "case": f"evaluate {kind}",
                "events_per_s": round(result.events_per_second),
                "seconds": round(result.seconds + fit, 2),
                "recall@20": round(result.metrics["recall@20"], 4),
                "mrr@20": round(result.metrics["mrr@20"], 4),
                "note": f"fit {fit:.1f}s + evaluation {result.seconds:.1f}s, {torch.get_num_threads()} threads",
            }
        )
    return rows
