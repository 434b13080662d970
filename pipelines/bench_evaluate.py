"""Evaluation throughput on the Diginetica test split (60,858 predictions over 43,097 items).

GRU4Rec (512 units) with the fast exact ranking and with plain fp32 scoring, and every baseline
(fit + evaluation). Uses the trained model of `configs/diginetica.yaml` when it exists, else an
untrained model of the same shape (said in the note; speed does not depend on training much,
only the share of rows that fall back to full fp32 scoring does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipelines.bench_train import load_train
from recsys.baselines import make_baseline
from recsys.config import ModelConfig
from recsys.evaluation import evaluate
from recsys.model.gru4rec import GRU4Rec
from recsys.model.recommender import GRU4RecRecommender

TRAINED = Path("data/diginetica/model/model.pt")


def bench_evaluate(quick: bool) -> list[dict[str, Any]]:
    dataset, origin = load_train()
    test = dataset.test.head(8000) if quick else dataset.test
    if TRAINED.exists() and not quick:
        model, _ = GRU4Rec.load(TRAINED)
        which = "trained model"
    else:
        model = GRU4Rec(dataset.n_items, ModelConfig(layers=[512]), seed=0)
        which = "untrained 512-unit model"
    rows: list[dict[str, Any]] = []
    rec = GRU4RecRecommender(dataset.n_items, model=model)
    for fast in (True, False):
        rec.fast_ranking = fast
        result = evaluate(rec, test, show_progress=False)
        rows.append(
            {
                "case": f"evaluate gru4rec ({'bf16 pass + exact fp32 check' if fast else 'full fp32'})",
                "events_per_s": round(result.events_per_second),
                "seconds": round(result.seconds, 2),
                "recall@20": round(result.metrics["recall@20"], 4),
                "mrr@20": round(result.metrics["mrr@20"], 4),
                "note": f"{origin}, {result.predictions:,} predictions, {which}",
            }
        )
    for kind in ("pop", "spop", "iknn", "sr", "vsknn", "stan"):
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
