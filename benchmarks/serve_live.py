"""The live service (``recsys serve-live``) against ``mlflow models serve``, on loopback.

The model is ``benchmarks.serve.build_model``'s (trained, Diginetica-shaped: 43,097 items, 512
units) with the real test sessions of the median length. Each request is one click: to the live
service the click alone (the session is kept there), to ``mlflow models serve`` the session's
prefix up to that click (it keeps nothing). Both servers run as subprocesses (one worker each)
and the load generator runs on the same machine, so its threads compete with the servers.

Cases (latency from the *scheduled* send for paced clients: no coordinated omission):
(d) saturation: closed-loop clients (50 for 20 s; quick: 10 for 4 s) against each server;
(e) 50 clients, each clicking every 200 ms, for 60 s against the live service;
(f) the same with a model roll-over 20 s in (alias moved, ``POST /admin/reload``);
(g) memory of 100,000 held sessions (the store's state + kept clicks, in this process) and the
    time to replay them into a model (what a roll-over does in the background).
Bounded: every run has a deadline and a request cap; everything goes to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load_gen import Request, run_clients
from benchmarks.measure import percentiles
from benchmarks.serve import K, build_model, log_model
from pipelines.serve import (
    HOST,
    free_port,
    running_server,
    start_server,
    stop_server,
    wait_ready,
)

NAME = "gru4rec-bench-live"
PACE_S = 0.2  # each paced client clicks every 200 ms
# clients, paced seconds, swap after seconds, saturation seconds, held sessions
FULL = (50, 60.0, 20.0, 20.0, 100_000)
QUICK = (10, 6.0, 2.0, 4.0, 10_000)
MAX_REQUESTS = 200_000


def clicks_of(sessions: list[list[Any]]) -> tuple[list[list[Any]], int]:
    """The test sessions of the median length (at least 2 clicks) and that length."""
    lengths = [len(s) for s in sessions if len(s) >= 2]
    median = int(np.median(lengths))
    return [s for s in sessions if len(s) == median], median


def live_requests(sessions: list[list[Any]], client: int, run: str) -> Callable[[int], Request]:
    """Client ``client``'s n-th request: the next click of its current session (ids new per
    ``run``, so that every run plays sessions of the median length from their start)."""
    length = len(sessions[0])

    def make(n: int) -> Request:
        s, t = divmod(n, length)
        session = sessions[(client * 7919 + s) % len(sessions)]
        body = json.dumps({"item": session[t], "k": K}).encode()
        return "POST", f"/sessions/{run}{client}-{s}/clicks", body

    return make


def stateless_requests(sessions: list[list[Any]], client: int) -> Callable[[int], Request]:
    """The same clicks for ``mlflow models serve``: each resends its session's prefix."""
    length = len(sessions[0])

    def make(n: int) -> Request:
        s, t = divmod(n, length)
        session = sessions[(client * 7919 + s) % len(sessions)]
        body = {"dataframe_records": [{"items": session[: t + 1]}], "params": {"k": K}}
        return "POST", "/invocations", json.dumps(body).encode()

    return make


def load(
    port: int,
    makers: list[Callable[[int], Request]],
    seconds: float,
    pace_s: float | None = None,
    during: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The makers' clients (``benchmarks.load_gen``) until the deadline or MAX_REQUESTS,
    closed loop or paced every ``pace_s`` s; ``during`` runs on this thread meanwhile."""
    result = run_clients(port, makers, seconds, pace_s, MAX_REQUESTS, during=during)
    samples = result["samples"]
    return {
        **percentiles(samples or [0.0]),
        "events_per_s": round(len(samples) / result["elapsed"], 1),
        "requests": len(samples),
        "errors": result["errors"],
        "hung_clients": result["hung_clients"],
    }


def _post(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        conn.request("POST", path, b"", {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def held_sessions_memory(model_path: Path, sessions: list[list[Any]], held: int) -> dict[str, Any]:
    """(g) RSS growth of ``held`` sessions made the way clicks make them (one GRU step per click
    for 64 sessions at a time, the state and kept clicks stored), then the time to replay them
    all into a model, which is what a roll-over does in the background."""
    import torch

    from recsys.serving.live_store import SessionStore, replay_states, step_states
    from recsys.serving.recommender import SessionRecommender

    torch.set_num_threads(1)
    rec = SessionRecommender.load(model_path, threads=1)
    picked = [sessions[i % len(sessions)] for i in range(held)]
    store: SessionStore[Any] = SessionStore(capacity=held)
    before = _rss_mib()
    now = store.clock()
    for start in range(0, held, 64):
        group = [store.get_or_start(f"held-{i}", now) for i in range(start, min(held, start + 64))]
        for t in range(len(picked[0])):
            items = [rec.to_indices([picked[start + j][t]])[0] for j in range(len(group))]
            stepping = [j for j, known in enumerate(items) if known]
            if stepping:
                states = [group[j].state for j in stepping]
                new = step_states(rec.model, states, [items[j][0] for j in stepping])
                for row, j in enumerate(stepping):
                    group[j].state = new[row].clone()
            for j, session in enumerate(group):
                store.keep(session, picked[start + j][t], items[j][0] if items[j] else None)
    grown = _rss_mib() - before
    began = time.perf_counter()
    replay_states(rec.model, [s.seen for _, s in store.items()])
    replay_s = time.perf_counter() - began
    return {
        "case": f"(g) {held:,} held sessions ({len(picked[0])} clicks each): memory and replay",
        "held_mib": round(grown, 1),
        "kib_per_session": round(grown * 1024 / held, 2),
        "replay_s": round(replay_s, 2),
        "events_per_s": round(held / replay_s, 1),
        "note": f"{sum(rec.model.state_sizes)} floats of state per session; replay = roll-over work",
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_serve_live(quick: bool) -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    clients, paced_s, swap_at_s, saturation_s, held = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        work = Path(tmp)
        model_path, sessions, note = build_model(work / "model.pt")
        median, length = clicks_of(sessions)
        note += f"; sessions of the median length, {length} clicks ({len(median):,} of them)"
        (work / "mlops").mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlops' / 'mlflow.db'}"}
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        uri = log_model(model_path, sessions)
        versions = [_register(uri), _register(uri)]  # the same weights twice: a real swap
        _alias(versions[0])
        rows.append(held_sessions_memory(model_path, median, held))
        port = free_port()
        command = [str(Path(sys.executable).parent / "recsys"), "serve-live"]
        command += ["-m", f"models:/{NAME}@champion", "-p", str(port), "--poll", "0"]
        live = start_server(command, env, work / "live.log")
        try:
            wait_ready(f"http://{HOST}:{port}", live, work / "live.log")

            def makers_for(run: str) -> list[Callable[[int], Request]]:
                return [live_requests(median, c, run) for c in range(clients)]

            load(port, makers_for("w")[:4], 2.0)  # warm-up
            result = load(port, makers_for("d"), saturation_s)
            rows.append(_row(f"(d) live service, {clients} closed-loop clients", result, note))
            paced = load(port, makers_for("e"), paced_s, PACE_S)
            label = f"live service, {clients} clients x 1 click/{PACE_S * 1e3:.0f} ms"
            rows.append(_row(f"(e) {label}, {paced_s:.0f} s", paced, note))
            swap: dict[str, Any] = {}

            def roll_over() -> None:
                time.sleep(swap_at_s)
                _alias(versions[1])
                start = time.perf_counter()
                status, answer = _post(port, "/admin/reload")
                swap.update(status=status, seconds=time.perf_counter() - start, **answer)

            across = load(port, makers_for("f"), paced_s, PACE_S, during=roll_over)
            swap_note = (
                f"; reload at {swap_at_s:.0f} s: HTTP {swap.get('status')}, swapped "
                f"{swap.get('swapped')}, {swap.get('replayed')} sessions replayed, "
                f"{swap.get('seconds', 0):.2f} s"
            )
            rows.append(_row(f"(f) {label} across a model swap", across, note + swap_note))
        finally:
            stop_server(live)
        makers = [stateless_requests(median, c) for c in range(clients)]
        with running_server(uri, env, work / "mlflow.log") as url:
            port = int(url.rsplit(":", 1)[1])
            load(port, makers[:4], 2.0)  # warm-up
            result = load(port, makers, saturation_s)
            label = f"(d) mlflow models serve, {clients} closed-loop clients (prefix resent)"
            rows.append(_row(label, result, note))
    return rows


def _row(case: str, result: dict[str, Any], note: str) -> dict[str, Any]:
    return {"case": case, **result, "note": note}


def _register(uri: str) -> str:
    import mlflow

    return str(mlflow.register_model(uri, NAME).version)


def _alias(version: str) -> None:
    from recsys.serving.mlflow_store import connect

    connect().set_registered_model_alias(NAME, "champion", version)


def sweep_windows(model: Path, windows: list[float], seconds: float = 10.0) -> list[dict[str, Any]]:
    """The batch window's effect: ``recsys serve-live -m MODEL --batch-window-ms W`` for each W,
    50 paced clients then 50 closed-loop ones for ``seconds`` each, on the Diginetica test
    sessions of the median length (``python -m benchmarks.serve_live MODEL 0,1,2``)."""
    from benchmarks.train import load_train
    from recsys.data.schema import ITEM, SESSION, TIME

    dataset, _ = load_train()
    grouped = dataset.test.sort(SESSION, TIME).group_by(SESSION, maintain_order=True).agg(ITEM)
    median, _ = clicks_of(grouped[ITEM].to_list())
    rows = []
    for window in windows:
        port = free_port()
        command = [str(Path(sys.executable).parent / "recsys"), "serve-live", "-m", str(model)]
        command += ["-p", str(port), "--batch-window-ms", str(window)]
        with tempfile.TemporaryDirectory(prefix="bench-window-") as tmp:
            log = Path(tmp) / "live.log"
            proc = start_server(command, dict(os.environ), log)
            try:
                wait_ready(f"http://{HOST}:{port}", proc, log)
                makers = [live_requests(median, c, f"w{window}-") for c in range(50)]
                load(port, makers[:4], 2.0)  # warm-up
                paced = load(port, makers, seconds, PACE_S)
                closed = load(port, [live_requests(median, c, "c") for c in range(50)], seconds)
            finally:
                stop_server(proc)
        rows.append({"window_ms": window, "paced": paced, "closed_loop": closed})
    return rows


if __name__ == "__main__":
    for result in sweep_windows(Path(sys.argv[1]), [float(w) for w in sys.argv[2].split(",")]):
        print(json.dumps(result))
