"""Data-parallel training: events/s of 1 and 2 processes (``train.nproc``, gloo on CPU) on the
embedded default log with ``configs/default.yaml``'s model and train sections, a fixed number
of global steps each (the same clicks per step: 2 processes share a step's slots).

Each process count is measured in the same benchmark process, back to back, so both see the
same machine; the 2-process figure includes its one all-reduce per step. ``threads: 0`` gives
the single process the usable cores less one and each of 2 processes cores // 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recsys.config import load_config
from recsys.data.preparation import prepare_events
from recsys.data.sources import read_events
from recsys.training.launch import train_data_parallel
from recsys.training.threads import default_threads

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
STEPS = 600
PROCESSES = (1, 2)


def bench_train_parallel(quick: bool) -> list[dict[str, Any]]:
    config = load_config(DEFAULT_CONFIG)
    data = prepare_events(read_events(config.data.source), config.data.preparation, "default")
    steps = 150 if quick else STEPS
    rows: list[dict[str, Any]] = []
    base = 0.0
    for n in PROCESSES:
        train_cfg = config.train.model_copy(update={"nproc": n, "max_steps": steps, "epochs": 1})
        record = train_data_parallel(data.train, data.n_items, config.model, train_cfg).history[0]
        rate = float(record["events_per_second"])
        base = base or rate
        rows.append(
            {
                "case": f"train default, {n} process{'es' if n > 1 else ''} (train.nproc {n})",
                "events_per_s": rate,
                "vs_one_process": round(rate / base, 3),
                "note": f"{steps} global steps of batch {train_cfg.batch_size}, gloo; "
                f"threads each: {default_threads()} alone, cores // N beside N-1 others",
            }
        )
    return rows
