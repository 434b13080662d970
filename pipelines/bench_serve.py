"""Serving latency on a Diginetica-sized model: in-process, live sessions, REST under load.

The model has the Diginetica catalogue (43,097 items; real ids and popularity from
../shared/data/diginetica when present, else synthetic ids), 512 units and the shared
embedding, but random weights: serving latency depends on the shapes, not on training, so
nothing is trained here. Request sessions are the real Diginetica test sessions (else random).

Cases (each a row: latency percentiles in ms and events/s):
(a) in-process ``recommend`` of one session, top-20 (fast certified top-k vs plain fp32, and
    torch with 1 vs the default number of threads);
(b) one ``LiveSessions.click`` (one GRU step + top-20);
(c) REST round trips to ``mlflow models serve`` from loopback clients: one client alone, then
    N concurrent clients (50 for 60 s; quick: 10 for 5 s), counting errors. The model is
    logged as the same pyfunc as ``recsys register`` logs, into a temporary SQLite store.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.bench import percentiles
from recsys.config import ModelConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.serving import SessionRecommender

DIGINETICA = (
    Path(__file__).resolve().parent.parent.parent / "shared/data/diginetica/diginetica_sessions.tsv"
)
N_ITEMS = 43_097
UNITS = 512
K = 20
HOST = "127.0.0.1"  # loopback only


def catalogue() -> tuple[list[int], list[float], list[list[int]], str]:
    """Item ids, their train popularity and test sessions; real Diginetica when available."""
    if DIGINETICA.exists():
        import polars as pl

        log = pl.read_csv(DIGINETICA, separator="\t")
        counts = log.filter(pl.col("split") == "train").group_by("item_id").len().sort("item_id")
        test = (
            log.filter(pl.col("split") == "test")
            .sort("session_id", "position")
            .group_by("session_id", maintain_order=True)
            .agg("item_id")
        )
        return (
            counts["item_id"].to_list(),
            [float(c) for c in counts["len"].to_list()],
            test["item_id"].to_list(),
            "Diginetica ids, popularity and test sessions",
        )
    rng = np.random.default_rng(0)
    ids = list(range(1, N_ITEMS + 1))
    support = (1.0 / np.arange(1, N_ITEMS + 1)).tolist()
    sessions = [
        rng.integers(1, N_ITEMS + 1, int(rng.integers(1, 11))).tolist() for _ in range(5000)
    ]
    return ids, support, sessions, "synthetic ids (../shared/data/diginetica not found)"


def build_model(item_ids: list[int], support: list[float], path: Path) -> Path:
    """A random-init GRU4Rec of the Diginetica shape, saved like a trained one."""
    model = GRU4Rec(len(item_ids), ModelConfig(layers=[UNITS], embedding="shared"), seed=0)
    model.save(path, {"item_ids": item_ids, "support": support, "dataset": "bench"})
    return path


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


def bench_in_process(
    model_path: Path, sessions: list[list[int]], n: int, note: str
) -> list[dict[str, Any]]:
    rows = []
    default_threads = os.cpu_count() or 1
    for fast, threads in ((True, 1), (False, 1), (True, default_threads)):
        torch.set_num_threads(threads)
        rec = SessionRecommender.load(model_path, fast_top_k=fast)
        todo = [lambda s=s, r=rec: r.recommend(s, k=K) for s in sessions[:n]]
        samples = time_calls(todo)
        kind = "certified fp16 top-k" if fast else "plain fp32 GEMV"
        stats = rec.fast_stats
        rows.append(
            row(
                f"(a) in-process top-{K}, {kind}, {threads} thread(s)",
                samples,
                f"{note}; mean session {np.mean([len(s) for s in sessions[:n]]):.1f} clicks"
                + (
                    f"; certified {stats['certified']}, fell back {stats['fallback']}"
                    if fast
                    else ""
                ),
            )
        )
    torch.set_num_threads(1)
    return rows


def bench_live(
    model_path: Path, sessions: list[list[int]], n: int, note: str
) -> list[dict[str, Any]]:
    rows = []
    for fast in (True, False):
        rec = SessionRecommender.load(model_path, fast_top_k=fast)
        live = rec.live()
        clicks = [(sid, item) for sid, s in enumerate(sessions) for item in s][:n]
        samples = time_calls([lambda c=c, lv=live: lv.click(*c, k=K) for c in clicks], warmup=0)
        kind = "certified fp16 top-k" if fast else "plain fp32 GEMV"
        rows.append(row(f"(b) live click + top-{K}, {kind}, 1 thread", samples, note))
    return rows


# --- REST ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def log_pyfunc(model_path: Path, sessions: list[list[int]]) -> str:
    """Log the model as ``recsys register`` does (same entry point, code, signature)."""
    import mlflow
    import pandas as pd

    from pipelines.register import PACKAGE_DIR, _pip_requirements, _signature
    from pipelines.tracking import experiment_id
    from recsys.mlflow_store import connect
    from recsys.pyfunc import SESSION_COLUMN

    # The project's experiment helper puts artifacts beside the SQLite store (the temporary
    # directory); MLflow's own default would be ./mlruns in the working directory.
    client = connect()
    with mlflow.start_run(experiment_id=experiment_id(client, "bench-serve")):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_DIR / "pyfunc_entry.py"),
            artifacts={"model": str(model_path)},
            code_paths=[str(PACKAGE_DIR)],
            signature=_signature(True),
            input_example=(pd.DataFrame({SESSION_COLUMN: sessions[:2]}), {"k": K}),
            pip_requirements=_pip_requirements(),
            model_config={"k": K},
        )
    return str(info.model_uri)


@contextlib.contextmanager
def rest_server(model_uri: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`mlflow models serve` on a free loopback port; SIGTERM to its process group at the end."""
    bin_dir = Path(sys.executable).parent
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    port = _free_port()
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "-h", HOST, "-p", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def load_test(
    url: str, bodies: list[bytes], clients: int, seconds: float, max_requests: int = 1_000_000
) -> dict[str, Any]:
    """``clients`` threads, each with a keep-alive connection, posting until the deadline."""
    port = int(url.rsplit(":", 1)[1])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    per_client = max(1, max_requests // clients)
    start_gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        start_gate.wait()
        i = c
        while time.monotonic() < deadline[0] and len(latencies[c]) + errors[c] < per_client:
            body = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"predictions"' in payload
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
            if ok:
                latencies[c].append((time.perf_counter() - t0) * 1e3)
            else:
                errors[c] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    start_gate.wait()
    for th in threads:
        th.join(timeout=seconds + 60)
    elapsed = time.monotonic() - began
    samples = [x for per in latencies for x in per]
    return {
        "samples": samples,
        "requests": len(samples),
        "errors": sum(errors),
        "rate": len(samples) / elapsed if elapsed > 0 else 0.0,
        "hung_clients": sum(th.is_alive() for th in threads),
    }


def bench_rest(
    model_path: Path, sessions: list[list[int]], quick: bool, workdir: Path, note: str
) -> list[dict[str, Any]]:
    store = workdir / "mlops"
    store.mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore",
    }
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        model_uri = log_pyfunc(model_path, sessions)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    bodies = [
        json.dumps({"dataframe_records": [{"items": s}], "params": {"k": K}}).encode()
        for s in sessions[:2000]
    ]
    clients, seconds = (10, 5.0) if quick else (50, 60.0)
    solo_seconds = 3.0 if quick else 10.0
    rows = []
    with rest_server(model_uri, env, workdir / "server.log") as url:
        load_test(url, bodies[:50], 1, 1.0)  # warm-up
        for n, secs in ((1, solo_seconds), (clients, seconds)):
            result = load_test(url, bodies, n, secs)
            rows.append(
                {
                    **row(
                        f"(c) REST POST /invocations, {n} concurrent client(s), {secs:.0f} s",
                        result["samples"],
                        f"{note}; one session per request, top-{K}; server: 1 torch thread, "
                        f"certified fp16 top-k; clients in the same machine",
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
    torch.set_num_threads(1)
    item_ids, support, sessions, origin = catalogue()
    note = f"untrained {UNITS}-unit GRU4Rec, {len(item_ids):,} items ({origin})"
    n_calls, n_clicks = (300, 1000) if quick else (2000, 5000)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        model_path = build_model(item_ids, support, workdir / "model.pt")
        rows = bench_in_process(model_path, sessions, n_calls, note)
        rows += bench_live(model_path, sessions, n_clicks, note)
        rows += bench_rest(model_path, sessions, quick, workdir, note)
    return rows


if __name__ == "__main__":
    for r in bench_serve("--quick" in sys.argv):
        print(json.dumps(r))
