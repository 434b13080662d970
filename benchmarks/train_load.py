"""Training under load: events/s of setting (a) alone, then beside one CPU-bound competitor.

The competitor is a busy loop in its own process, started here, bounded in time and stopped by
its PID. Each case runs in a fresh child process (torch's thread pool is per process and is
sized once), quiet and loaded back to back, so both figures see the same machine. The cases:
the default ``train.threads: 0`` (``recsys.training.threads``) and torch's own default (one
intra-op thread per core, what ``threads: 0`` meant before), which spin-waits for a core the
competitor holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

STEPS = 300
COMPETITOR_SECONDS = 120  # the busy loop ends by itself even if this process is killed
CASES = {
    "default (threads: 0)": 0,
    "torch default (one thread per core)": -1,
}
_CHILD = "benchmarks.train_load"


def _competitor() -> subprocess.Popen[bytes]:
    loop = f"import time\nend = time.monotonic() + {COMPETITOR_SECONDS}\nwhile time.monotonic() < end: pass"
    return subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.DEVNULL)


def _measure(threads: int, steps: int) -> dict[str, Any]:
    """In the child: quiet events/s, then with the competitor running (same process, same data)."""
    import torch

    from benchmarks.train import settings, train_steps
    from recsys.config import PreparationConfig, SourceConfig
    from recsys.data.preparation import prepare_events
    from recsys.data.sources import read_events
    from recsys.data.synthetic import SyntheticConfig
    from recsys.training.threads import apply_threads

    if threads >= 0:
        apply_threads(threads)
    source = SourceConfig(format="synthetic", synthetic=SyntheticConfig())
    data = prepare_events(read_events(source), PreparationConfig(), "synthetic")
    model_cfg, train_cfg = next(iter(settings().values()))
    quiet, _ = train_steps(data.train, data.n_items, model_cfg, train_cfg, steps)
    competitor = _competitor()
    try:
        time.sleep(0.5)
        loaded, _ = train_steps(data.train, data.n_items, model_cfg, train_cfg, steps)
    finally:
        competitor.kill()
        competitor.wait()
    return {
        "threads": torch.get_num_threads(),
        "quiet": quiet["events_per_s"],
        "loaded": loaded["events_per_s"],
    }


def bench_train_load(quick: bool) -> list[dict[str, Any]]:
    steps = 100 if quick else STEPS
    rows = []
    for name, threads in CASES.items():
        out = subprocess.run(
            [sys.executable, "-m", _CHILD, str(threads), str(steps)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
            env={**os.environ, "RECSYS_QUIET": "1"},
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        share = result["loaded"] / max(result["quiet"], 1)
        rows.append(
            {
                "case": f"train (a) under load, {name}",
                "events_per_s": result["loaded"],
                "quiet_events_per_s": result["quiet"],
                "loaded_share": round(share, 3),
                "note": f"{result['threads']} intra-op threads, one busy-loop competitor, "
                f"{steps} steps each, synthetic default log",
            }
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]))))
