"""What a catalogue's size costs: training, evaluation and one recommend call at 43k to 1M items.

Each size runs in a child process of its own (its peak RSS is its own). The log is generated
with a flat power law (exponent 0.3, so nearly every item of the catalogue is clicked) and
prepared with ``min_item_support: 1``; the catalogue is the items of its train split. Training
is setting (a) of ``benchmarks/train.py`` for a fixed number of steps; the state that grows
with the catalogue (item matrices, optimiser accumulators and velocities, support, sampling
tables) is counted tensor by tensor and stated in bytes per item. Then one evaluation of up to
the test split's first sessions (``EVAL_PREDICTIONS`` rows more than it has sessions) over the whole catalogue, and one ``recommend`` call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import polars as pl
import psutil
import torch

from benchmarks.measure import peak_rss_mib
from benchmarks.prepare import synthetic_log
from benchmarks.train import settings, train_steps
from recsys.config import PreparationConfig

CATALOGUES = (43_097, 250_000, 1_000_000)
EVENTS_PER_ITEM = 5  # events generated per catalogue item (at least 2M)
STEPS = 300
EVAL_PREDICTIONS = 5_000
EXPONENT = 0.3


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _item_tensors(obj: Any, n_items: int, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors with one row per item reachable from ``obj`` (attributes, dicts)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or obj.dim() == 0 or obj.shape[0] != n_items:
            return 0
        seen.add(id(obj))
        return obj.nelement() * obj.element_size()
    if depth > 3:
        return 0
    values: Any = ()
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        values = vars(obj).values()
    return sum(_item_tensors(v, n_items, seen, depth + 1) for v in values)


def items_child(n_target: int, quick: bool) -> dict[str, Any]:
    """One catalogue size, measured in this process."""
    from recsys.data.batching import session_arrays
    from recsys.data.preparation import prepare_events
    from recsys.evaluation.gru4rec import GRU4RecScorer
    from recsys.evaluation.harness import evaluate
    from recsys.model.artifact import ItemIndex, TrainedModel
    from recsys.serving.recommender import SessionRecommender
    from recsys.training.trainer import Trainer, item_support

    threads = os.environ.get("RECSYS_SCALE_THREADS")  # 1 on a loaded machine: no spinning
    if threads:
        torch.set_num_threads(int(threads))
    n_events = max(2_000_000, EVENTS_PER_ITEM * n_target) // (4 if quick else 1)
    log = synthetic_log(n_events, n_items=n_target, exponent=EXPONENT, days=20)
    prep = PreparationConfig(min_item_support=1, test_days=1)
    data = prepare_events(log.lazy().rename(_CANONICAL).with_columns(_TIME), prep, "generated")
    del log
    n_items = data.n_items
    model_cfg, train_cfg = settings()["a: 100 units, batch 32, XE+logQ"]
    steps = STEPS // (5 if quick else 1)
    result, model = train_steps(data.train, n_items, model_cfg, train_cfg, steps)
    # a trainer of its own, run a few steps so that the optimiser's state exists, then counted
    few = train_cfg.model_copy(update={"max_steps": 3})
    probe = Trainer(model, few, item_support(data.train, n_items), torch.device("cpu"))
    probe.run_epoch(session_arrays(data.train), epoch=0)
    seen: set[int] = set()  # the trainer holds the model too: count each tensor once
    state = _item_tensors(model, n_items, seen) + _item_tensors(probe, n_items, seen)
    del probe
    test = data.test.head(EVAL_PREDICTIONS + data.test["session_id"].n_unique())
    ev_start = _rss_mib()
    ev = evaluate(GRU4RecScorer(model), test, show_progress=False)
    ev_rss = peak_rss_mib()
    items = data.items.sort("item_idx")
    rec = SessionRecommender(
        TrainedModel(model, ItemIndex.of(items["item_id"].to_list(), items["support"].to_list()))
    )
    session = data.test["item_id"].head(5).to_list()
    rec.recommend(session, k=20)  # the first call builds the ranker's cache
    start = time.perf_counter()
    calls = 20
    for _ in range(calls):
        rec.recommend(session, k=20)
    recommend_ms = (time.perf_counter() - start) / calls * 1000
    return {
        "items": n_items,
        "train_events": data.train.height,
        "events_per_s": result["events_per_s"],
        "steps": result["steps"],
        "state_bytes_per_item": round(state / n_items, 1),
        "eval_predictions": ev.predictions,
        "eval_events_per_s": round(ev.events_per_second),
        "eval_rss_growth_mib": round(ev_rss - ev_start, 1),
        "recommend_ms": round(recommend_ms, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "threads": torch.get_num_threads(),
    }


_CANONICAL = {"session": "session_id", "item": "item_id", "ts": "timestamp"}
_TIME = pl.col("timestamp").cast(pl.Datetime("ms", "UTC"))


def bench_items(quick: bool) -> list[dict[str, Any]]:
    """One row per catalogue size (``--quick``: the two smaller, a quarter of the events)."""
    rows = []
    for n in CATALOGUES[:2] if quick else CATALOGUES:
        cmd = [sys.executable, "-m", "benchmarks.scale", "--child", "items", str(n)]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        label = f"train (a) on {n:,} items"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            rows.append({"case": label, "note": " | ".join(tail)})
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "case": f"train (a) on {got['items']:,} items",
                "events_per_s": got["events_per_s"],
                "peak_rss_mib": got["peak_rss_mib"],
                "note": (
                    f"{got['steps']} steps, {got['threads']} threads; "
                    f"{got['state_bytes_per_item']} B/item of state; evaluation "
                    f"{got['eval_events_per_s']:,} predictions/s over the catalogue "
                    f"(+{got['eval_rss_growth_mib']} MiB peak); recommend "
                    f"{got['recommend_ms']} ms"
                ),
                **{k: got[k] for k in ("items", "state_bytes_per_item", "recommend_ms")},
            }
        )
    return rows
