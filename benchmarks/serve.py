"""Serving latency on the Diginetica catalogue: in-process, live sessions, REST under load.

The model is ``benchmarks.train.bench_model``'s: 43,097 items with their real ids and popularity,
512 units, shared embedding, trained (the Diginetica pipeline's model when present, else
1,000 steps of the published setting). Trained, not random: how often the certified
low-precision pass settles a request depends on the score structure, and random weights give
flat scores that nothing could certify. Requests are the real Diginetica test sessions.

Cases (each a row: latency percentiles in ms and events/s):
(a) in-process ``recommend`` of one whole session, top-20 (certified int4/int8 passes vs plain fp32,
    1 torch thread vs all cores);
(b) one ``LiveSessions.click`` (one GRU step + top-20), same variants, and the int4 first tier
    on vs off in the same process, alternating (``bench_int4_tier``);
(c) REST round trips to ``mlflow models serve`` (one worker, see WORKERS) from loopback clients:
    one client with empty sessions (the HTTP + MLflow stack alone), one client, N clients in a
    closed loop (saturation), N clients paced at a visitor's click rate (50 for 60 s each;
    quick: 10 for 5 s), counting errors. The model is logged as the same pyfunc as
    ``recsys register`` logs, into a temporary SQLite store.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.measure import percentiles
from pipelines.serve import running_server
from recsys.data.schema import ITEM, SESSION, TIME
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.serving.mlflow_store import quiet_environment
from recsys.serving.recommender import SessionRecommender

K = 20
PACED_RATE = 2.0  # requests/s per paced client: a visitor clicking every half second
WORKERS = 1  # see pipelines.serve: uvicorn's --workers N loses TCP_NODELAY


def build_model(path: Path) -> tuple[Path, list[list[Any]], str]:
    """The benchmark model saved like a trained one, its test sessions (original ids), a note.

    ``benchmarks.train.bench_model``: the trained Diginetica model when present, else a briefly
    trained one; never random weights, whose flat scores no certified top-k could settle.
    """
    from benchmarks.train import bench_model, load_train

    dataset, origin = load_train()
    model, which = bench_model(dataset)
    TrainedModel(model, ItemIndex.from_table(dataset.items)).save(path)
    sessions = (
        dataset.test.sort(SESSION, TIME)
        .group_by(SESSION, maintain_order=True)
        .agg(ITEM)[ITEM]
        .to_list()
    )
    note = f"{which}, {dataset.n_items:,} items, {origin} test sessions"
    return path, sessions, note


def time_calls(calls: list[Callable[[], Any]], warmup: int = 20) -> list[float]:
    for call in calls[:warmup]:
        call()
    samples = []
    for call in calls:
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def row(case: str, samples: list[float], note: str, **extra: Any) -> dict[str, Any]:
    rate = 1e3 / float(np.mean(samples)) if samples else 0.0
    return {
        "case": case,
        **percentiles(samples),
        "events_per_s": round(rate, 1),
        "note": note,
        **extra,
    }


def bench_library(
    model_path: Path, sessions: list[list[Any]], n_calls: int, n_clicks: int, note: str
) -> list[dict[str, Any]]:
    """(a) ``recommend`` of whole sessions and (b) live clicks, per kind of top-k and threads."""
    rows = []
    clicks = [(sid, item) for sid, s in enumerate(sessions) for item in s][:n_clicks]
    mean_clicks = np.mean([len(s) for s in sessions[:n_calls]])
    for fast, threads in ((True, 1), (False, 1), (True, os.cpu_count() or 1)):
        torch.set_num_threads(threads)
        for case in ("a", "b"):
            rec = SessionRecommender.load(model_path, fast_top_k=fast)
            if case == "a":
                calls = [lambda s=s, r=rec: r.recommend(s, k=K) for s in sessions[:n_calls]]
                label, detail = "(a) in-process top-", f"; mean session {mean_clicks:.1f} clicks"
            else:
                live = rec.live()
                calls = [lambda c=c, lv=live: lv.click(*c, k=K) for c in clicks]
                label, detail = "(b) live click + top-", ""
            samples = time_calls(calls, warmup=20 if case == "a" else 0)
            stats = rec.fast_stats
            rows.append(
                row(
                    f"{label}{K}, {_kind(fast)}, {threads} thread(s)",
                    samples,
                    note + detail + (_certified(stats) if fast else ""),
                )
            )
    torch.set_num_threads(1)
    return sorted(rows, key=lambda r: r["case"][:3])


def bench_int4_tier(
    model_path: Path, sessions: list[list[Any]], n_clicks: int, note: str, rounds: int = 3
) -> list[dict[str, Any]]:
    """(b) with the int4 first tier on and off (``recsys.ranking.INT4_ROWS`` 0), 1 thread, in
    the same process, alternating per round: the VM drifts more between runs than this moves."""
    from recsys import ranking

    clicks = [(sid, item) for sid, s in enumerate(sessions) for item in s][:n_clicks]
    torch.set_num_threads(1)
    rec = SessionRecommender.load(model_path, fast_top_k=True)
    samples: dict[bool, list[float]] = {True: [], False: []}
    shipped = ranking.INT4_ROWS
    try:
        for r in range(rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                ranking.INT4_ROWS = shipped if on else 0
                live = rec.live()  # fresh sessions each round: the same clicks, the same work
                calls = [lambda c=c, lv=live: lv.click(*c, k=K) for c in clicks]
                samples[on] += time_calls(calls, warmup=0)
    finally:
        ranking.INT4_ROWS = shipped
    p50 = {on: percentiles(v)["p50_ms"] for on, v in samples.items()}
    detail = f"; {rounds} alternating rounds; p50 ratio on/off {p50[True] / p50[False]:.2f}"
    return [
        row(
            f"(b) live click + top-{K}, int4 tier {'on' if on else 'off'}, 1 thread, A/B",
            v,
            note + detail,
        )
        for on, v in samples.items()
    ]


def _kind(fast: bool) -> str:
    return "certified int4/int8 passes + fp32 check" if fast else "plain fp32 GEMV"


def _certified(stats: dict[str, int]) -> str:
    return f"; certified {stats['certified']}, fell back {stats['fallback']}"


# --- REST ---------------------------------------------------------------------------------------


def log_model(model_path: Path, sessions: list[list[int]]) -> str:
    """Log the model with ``recsys register``'s ``log_pyfunc``; returns the logged model's URI."""
    import mlflow

    from pipelines.tracking import experiment_id
    from recsys.serving.mlflow_store import connect, log_pyfunc

    # The project's experiment helper puts artifacts beside the SQLite store (the temporary
    # directory); MLflow's own default would be ./mlruns in the working directory.
    client = connect()
    with mlflow.start_run(experiment_id=experiment_id(client, "bench-serve")):
        info = log_pyfunc(model_path, sessions[:2])
    return str(info.model_uri)


def load_test(
    url: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    max_requests: int = 1_000_000,
    rate_per_client: float | None = None,
) -> dict[str, Any]:
    """``clients`` clients posting ``bodies`` to ``/invocations`` (``benchmarks.load_gen``):
    closed loop, or paced at ``rate_per_client`` requests/s each."""
    from benchmarks.load_gen import run_clients

    def maker(c: int) -> Callable[[int], tuple[str, str, bytes]]:
        return lambda n: ("POST", "/invocations", bodies[(c + n * clients) % len(bodies)])

    result = run_clients(
        int(url.rsplit(":", 1)[1]),
        [maker(c) for c in range(clients)],
        seconds,
        1.0 / rate_per_client if rate_per_client else None,
        max_requests,
        accept=lambda payload: b'"predictions"' in payload,
    )
    elapsed = result["elapsed"]
    return {
        "samples": result["samples"],
        "requests": len(result["samples"]),
        "errors": result["errors"],
        "rate": len(result["samples"]) / elapsed if elapsed > 0 else 0.0,
        "hung_clients": result["hung_clients"],
    }


def bench_rest(
    model_path: Path, sessions: list[list[int]], quick: bool, workdir: Path, note: str
) -> list[dict[str, Any]]:
    store = workdir / "mlops"
    store.mkdir()
    quiet_environment()  # before MLflow is imported; the server inherits it
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        model_uri = log_model(model_path, sessions)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    bodies = [
        json.dumps({"dataframe_records": [{"items": s}], "params": {"k": K}}).encode()
        for s in sessions[:2000]
    ]
    empty = json.dumps({"dataframe_records": [{"items": []}], "params": {"k": K}}).encode()
    clients, seconds = (10, 5.0) if quick else (50, 60.0)
    solo_seconds = 3.0 if quick else 10.0
    server = f"server: {WORKERS} worker x 1 torch thread; clients on the same machine"
    cases = [
        (
            "1 client, empty sessions (popular fallback: the HTTP + MLflow stack alone)",
            [empty],
            1,
            solo_seconds,
            None,
        ),
        ("1 client", bodies, 1, solo_seconds, None),
        (
            f"{clients} clients, closed loop (each sends when its last reply is back)",
            bodies,
            clients,
            seconds,
            None,
        ),
        (
            f"{clients} clients paced at {PACED_RATE:g} req/s each (latency from the scheduled send)",
            bodies,
            clients,
            seconds,
            PACED_RATE,
        ),
    ]
    rows = []
    with running_server(model_uri, env, workdir / "server.log", WORKERS) as url:
        load_test(url, bodies[:50], 1, 1.0)  # warm-up
        for label, payloads, n, secs, rate in cases:
            result = load_test(url, payloads, n, secs, rate_per_client=rate)
            rows.append(
                {
                    **row(
                        f"(c) REST POST /invocations, {label}, {secs:.0f} s",
                        result["samples"],
                        f"{note}; one session per request, top-{K}; {server}",
                    ),
                    "events_per_s": round(result["rate"], 1),
                    "requests": result["requests"],
                    "errors": result["errors"],
                    "hung_clients": result["hung_clients"],
                }
            )
    return rows


def bench_serve(quick: bool) -> list[dict[str, Any]]:
    """Rows for ``make bench`` (see the module docstring)."""
    n_calls, n_clicks = (300, 1000) if quick else (2000, 5000)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        model_path, sessions, note = build_model(workdir / "model.pt")
        rows = bench_library(model_path, sessions, n_calls, n_clicks, note)
        rows += bench_int4_tier(model_path, sessions, n_clicks, note)
        rows += bench_rest(model_path, sessions, quick, workdir, note)
    return rows


if __name__ == "__main__":
    for r in bench_serve("--quick" in sys.argv):
        print(json.dumps(r))
