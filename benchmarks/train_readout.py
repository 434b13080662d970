"""``make bench`` → ``train-readout``: the repeat readout's training cost, as the ratio issue
#13 budgets (events/s with the readout within 15 % of without).

The ``train`` rows time each setting once, and the VM's speed drifts between two settings'
minutes by more than the readout costs (a ratio of two such rows moved from 0.75 to 1.02 between
rounds). So here a plain setting and its readout variant are two warmed-up trainers in one
process and one thread, run in turn for short chunks of steps of the real epoch loop (the order
alternating), and the ratio is that of their summed events/s over all chunks, with the middle
half of the chunk ratios beside it for the spread. Pairs: (a) against (a+), (b) against (b+).
``python -m benchmarks.train_readout [CHUNKS]`` runs it alone (default 12).
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import torch

from benchmarks.train import SETTING_B, load_train, settings, warm_trainer

PAIRS = {  # name: (plain setting, its readout variant, steps per chunk)
    "a": ("a: 100 units, batch 32, XE+logQ", "a+: (a) with the repeat readout", 300),
    "b": (SETTING_B, "b+: (b) with the repeat readout", 100),
}
BUDGET = 0.85  # issue #13: training speed with the readout within 15 % of without


def bench_train_readout(quick: bool, chunks: int = 12) -> list[dict[str, Any]]:
    chunks = 2 if quick else chunks
    torch.set_num_threads(1)  # the 2-core VM's other core stays free: less drift
    dataset, origin = load_train()
    configs = settings()
    rows: list[dict[str, Any]] = []
    for pair, (plain, readout, steps) in PAIRS.items():
        trainers = {}
        for name in (plain, readout):
            trainer, arrays = warm_trainer(dataset.train, dataset.n_items, *configs[name])
            trainer.config = trainer.config.model_copy(update={"max_steps": steps})
            trainers[name] = trainer
        events = dict.fromkeys(trainers, 0)
        seconds = dict.fromkeys(trainers, 0.0)
        ratios = []
        for c in range(chunks):
            speed = {}
            for name in (plain, readout) if c % 2 == 0 else (readout, plain):
                record = trainers[name].run_epoch(arrays, epoch=0)
                events[name] += record["events"]
                seconds[name] += record["seconds"]
                speed[name] = record["events"] / record["seconds"]
            ratios.append(speed[readout] / speed[plain])
        rate = {name: events[name] / seconds[name] for name in trainers}
        ratio = rate[readout] / rate[plain]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        verdict = "met" if ratio >= BUDGET else "NOT met"
        rows.append(
            {
                "case": f"train-readout ({pair}+) vs ({pair})",
                "events_per_s": round(rate[readout]),
                "baseline_events_per_s": round(rate[plain]),
                "ratio": round(ratio, 3),
                "chunk_ratio_quartiles": [round(q, 3) for q in quartiles],
                "note": f"ratio {ratio:.3f} (chunks' middle half {quartiles[0]:.3f}-"
                f"{quartiles[2]:.3f}) against ({pair}) at {rate[plain]:,.0f} events/s, "
                f"budget {BUDGET}: {verdict}; {origin}, {chunks} x {steps} steps each, 1 thread",
            }
        )
    return rows


if __name__ == "__main__":
    for row in bench_train_readout(False, *(int(a) for a in sys.argv[1:])):
        print(json.dumps(row), flush=True)
