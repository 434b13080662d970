"""Two code trees' live services, served in turn on the same minutes of the machine.

The VM's speed drifts more between two runs of ``serve-live`` than a change to the hot path
moves its numbers, so a change is measured against its parent here, interleaved:

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.serve_live_ab /tmp/before [ROUNDS] [SECONDS]

This tree's ``recsys serve-live`` and the other tree's (the same interpreter, the other tree
first on ``PYTHONPATH``) serve the same trained model (``benchmarks.serve.build_model``) in
turn. Each round plays 50 clients x 1 click / 200 ms for SECONDS against each, the order
alternating per round. Per round and tree it prints one JSON line with the clients' p50, p90
and p99, the errors, and the clicks per batch and worker's busy ms per batch (``/metrics``).
Bounded like the other load benchmarks: a deadline, a request cap, loopback only.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.serve import build_model
from benchmarks.serve_live import PACE_S, clicks_of, live_requests, load
from pipelines.serve import HOST, free_port, start_server, stop_server, wait_ready

CLIENTS = 50
COUNTERS = ("batches_total", "batched_operations_total", "batcher_busy_seconds_total")


def worker_counters(port: int) -> dict[str, float]:
    """The batcher's counters from the service's Prometheus text."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = {}
    for line in text.splitlines():
        for key in COUNTERS:
            if line.startswith(f"recsys_live_{key} "):
                found[key] = float(line.rsplit(" ", 1)[1])
    return found


def one_round(
    tree: Path | None, model: Path, median: list[list[Any]], tag: str, seconds: float
) -> dict[str, Any]:
    """One tree's service for one round of paced clients; None = this tree."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    port = free_port()
    command = [str(Path(sys.executable).parent / "recsys"), "serve-live", "-m", str(model)]
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        log = Path(tmp) / "live.log"
        proc = start_server([*command, "-p", str(port)], env, log)
        try:
            wait_ready(f"http://{HOST}:{port}", proc, log)
            load(port, [live_requests(median, c, f"w{tag}") for c in range(4)], 2.0)  # warm-up
            before = worker_counters(port)
            makers = [live_requests(median, c, tag) for c in range(CLIENTS)]
            result = load(port, makers, seconds, PACE_S)
            after = worker_counters(port)
        finally:
            stop_server(proc)
    delta = {k: after[k] - before[k] for k in COUNTERS}
    batches = max(delta["batches_total"], 1.0)
    return {
        **{k: result[k] for k in ("p50_ms", "p90_ms", "p99_ms", "requests", "errors")},
        "clicks_per_batch": round(delta["batched_operations_total"] / batches, 2),
        "busy_ms_per_batch": round(delta["batcher_busy_seconds_total"] / batches * 1e3, 3),
    }


def main(args: list[str]) -> None:
    other = Path(args[0]).resolve()
    rounds = int(args[1]) if len(args) > 1 else 4
    seconds = float(args[2]) if len(args) > 2 else 20.0
    with tempfile.TemporaryDirectory(prefix="bench-ab-model-") as tmp:
        model, sessions, note = build_model(Path(tmp) / "model.pt")
        median, _ = clicks_of(sessions)
        print(json.dumps({"model": note}), flush=True)
        trees: list[tuple[str, Path | None]] = [("this", None), ("other", other)]
        for r in range(rounds):
            for name, tree in trees if r % 2 == 0 else trees[::-1]:
                row = one_round(tree, model, median, f"r{r}{name}-", seconds)
                print(json.dumps({"tree": name, "round": r, **row}), flush=True)


if __name__ == "__main__":
    if not sys.argv[1:] or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m benchmarks.serve_live_ab OTHER_TREE [ROUNDS] [SECONDS]")
    main(sys.argv[1:])
