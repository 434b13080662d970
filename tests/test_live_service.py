"""The live service: micro-batched clicks, real HTTP on 127.0.0.1, bad input, model roll-over.

Scoring is checked against the library on the RSC15-trained model (`trained`); the HTTP tests
run the real app under uvicorn on a free loopback port in this process; the roll-over test
registers two versions in a private SQLite MLflow store and swaps under load. The end-to-end
test starts `recsys serve-live` as a subprocess and stops it by its PID.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.serve import free_port, start_server, stop_server, wait_ready
from pipelines.serve_live import LiveOptions, build_service
from recsys.config import ModelConfig
from recsys.data.preparation import PreparedDataset
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.serving.live_app import LiveService, create_app
from recsys.serving.live_batcher import Click, MicroBatcher, Read
from recsys.serving.live_store import SessionStore
from recsys.serving.recommender import Recommendation, SessionRecommender
from tests.conftest import QUIET, ROOT, run_cli
from tests.helpers import assert_same, real_sessions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow

LIVE_ATOL = 1e-5  # a batched step sums its products in another order than a re-run (float rounding)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rec(trained: tuple[PreparedDataset, Path]) -> SessionRecommender:
    return SessionRecommender.load(trained[1])


@pytest.fixture(scope="module")
def sessions(trained: tuple[PreparedDataset, Path]) -> list[list[int]]:
    return real_sessions(trained[0], 12)


def expected_after(rec: SessionRecommender, prefix: list[Any], k: int, **kw: Any) -> Recommendation:
    """What a live click answers: the re-run's ranking; ``unknown`` names this click's id only."""
    full = rec.recommend(prefix, k=k, **kw)
    return replace(full, unknown=[prefix[-1]] if prefix[-1] in full.unknown else [])


# --- micro-batching ------------------------------------------------------------------------------


def test_batched_clicks_answer_as_one_at_a_time_scoring(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    """Every session's t-th click submitted at once: one batch per round, each answer the
    re-run of its prefix, as LiveSessions (one click at a time) answers it."""
    batcher = MicroBatcher(rec, SessionStore(), window_s=0.05, max_batch=64)
    one_at_a_time = rec.live()
    try:
        for t in range(max(len(s) for s in sessions)):
            active = [(i, s) for i, s in enumerate(sessions) if t < len(s)]
            futures = [
                batcher.submit(Click(f"s{i}", s[t], 10, exclude_seen=i % 2 == 1)) for i, s in active
            ]
            for (i, s), future in zip(active, futures, strict=True):
                got = future.result(30)
                exclude = i % 2 == 1
                alone = one_at_a_time.click(f"s{i}", s[t], k=10, exclude_seen=exclude)
                assert_same(got, alone, atol=LIVE_ATOL)
                expected = expected_after(rec, s[: t + 1], 10, exclude_seen=exclude)
                assert_same(got, expected, atol=LIVE_ATOL)
        assert batcher.batches < batcher.batched_ops  # clicks were gathered, not run singly
        # a read scores the kept state without a click, batched with clicks of other sessions
        read, click = batcher.submit(Read("s0", 5, False)), batcher.submit(Click("s1", 0, 5, False))
        assert_same(read.result(30), rec.recommend(sessions[0], k=5), atol=LIVE_ATOL)
        assert click.result(30).unknown == [0]
    finally:
        batcher.close()


def test_two_clicks_of_one_session_in_a_batch_run_in_order(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    batcher = MicroBatcher(rec, SessionStore(), window_s=0.05)
    try:
        session = sessions[0]
        futures = [batcher.submit(Click("same", item, 5, False)) for item in session]
        for t, future in enumerate(futures):
            assert_same(future.result(30), rec.recommend(session[: t + 1], k=5), atol=LIVE_ATOL)
    finally:
        batcher.close()


def test_store_is_bounded_by_capacity_ttl_and_kept_clicks() -> None:
    now = [0.0]
    store = SessionStore(capacity=2, ttl_seconds=10, max_clicks=3, clock=lambda: now[0])
    for sid in ("a", "b"):
        session = store.get_or_start(sid, now[0])
        for item in (1, 2, 3, 4):
            store.keep(session, f"id{item}", item)
    kept = store.get_or_start("a", now[0])  # the last 3 clicks are kept, ids and indices
    assert (kept.clicks, kept.seen, kept.changes) == (["id2", "id3", "id4"], [2, 3, 4], 4)
    store.get_or_start("c", now[0])  # over capacity: b, the least recently used, goes
    assert store.get("b", now[0]) is None and len(store) == 2 and store.evicted == 1
    now[0] = 11.0
    assert store.get("a", now[0]) is None  # idle past the TTL
    assert store.expire() == 1 and len(store) == 0 and store.evicted == 3


# --- HTTP on 127.0.0.1 ---------------------------------------------------------------------------


class Http:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, **headers: str
    ) -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **headers}
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text


@pytest.fixture
def serve_app() -> Iterator[Any]:
    """Start services under uvicorn in this process, each on a free loopback port."""
    import uvicorn

    started: list[tuple[Any, threading.Thread, LiveService]] = []

    def start(service: LiveService) -> Http:
        port = free_port()
        config = uvicorn.Config(
            create_app(service), host="127.0.0.1", port=port, log_level="error", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        started.append((server, thread, service))
        return Http(f"http://127.0.0.1:{port}")

    yield start
    for server, thread, service in started:
        server.should_exit = True
        thread.join(10)
        service.batcher.close()


@pytest.fixture
def http(rec: SessionRecommender, serve_app: Any) -> Http:
    batcher = MicroBatcher(rec, SessionStore(capacity=100), label=None)
    return serve_app(LiveService(batcher, "rsc", body_limit=10_000, max_k=200))


def test_http_clicks_reads_deletes_and_invocations_match_the_library(
    http: Http, rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    session = sessions[1]
    for t, item in enumerate(session):
        status, answer = http.call("POST", "/sessions/u1/clicks", {"item": item, "k": 7})
        assert status == 200
        assert_same(Recommendation(**answer), expected_after(rec, session[: t + 1], 7), LIVE_ATOL)
    status, answer = http.call("GET", "/sessions/u1/recommendations?k=4&exclude_seen=true")
    expected = rec.recommend(session, k=4, exclude_seen=True)
    assert status == 200 and not set(answer["items"]) & set(session)
    assert_same(Recommendation(**answer), expected, LIVE_ATOL)
    assert http.call("DELETE", "/sessions/u1") == (200, {"session_id": "u1", "deleted": True})
    assert http.call("GET", "/sessions/u1/recommendations")[0] == 404
    # /invocations: the body and answer of `mlflow models serve`, both frame layouts
    body = {"dataframe_records": [{"items": s} for s in sessions[:3]] + [{"items": []}]}
    status, answer = http.call("POST", "/invocations", {**body, "params": {"k": 5}})
    assert status == 200 and list(answer) == ["predictions"]
    expected = rec.recommend_batch(sessions[:3] + [[]], k=5)
    for got, want in zip(answer["predictions"], expected, strict=True):
        assert_same(Recommendation(**got), want, 1e-6)
    split = {"dataframe_split": {"columns": ["items"], "data": [[sessions[0]]]}}
    status, answer = http.call("POST", "/invocations", split)
    assert status == 200
    assert_same(Recommendation(**answer["predictions"][0]), rec.recommend(sessions[0]), 1e-6)
    status, health = http.call("GET", "/health")
    assert status == 200 and health["items"] == rec.n_items and health["model"] == "rsc"


@pytest.mark.parametrize(
    ("method", "path", "raw", "headers", "status", "reason"),
    [
        ("POST", "/sessions/a/clicks", b"not json", {}, 400, "invalid JSON"),
        (
            "POST",
            "/sessions/a/clicks",
            b'{"item": 1.5}',
            {},
            400,
            "field 'item' must be an item id",
        ),
        (
            "POST",
            "/sessions/a/clicks",
            b'{"item": true}',
            {},
            400,
            "field 'item' must be an item id",
        ),
        (
            "POST",
            "/sessions/a/clicks",
            b'{"item": [1]}',
            {},
            400,
            "field 'item' must be an item id",
        ),
        ("POST", "/sessions/a/clicks", b"{}", {}, 400, "field 'item' is missing"),
        ("POST", "/sessions/a/clicks", b'{"item": 1, "kk": 2}', {}, 400, "unexpected field"),
        ("POST", "/sessions/a/clicks", b'{"item": 1, "k": 0}', {}, 400, "from 1 to 200, got 0"),
        ("POST", "/sessions/a/clicks", b'{"item": 1, "k": 201}', {}, 400, "from 1 to 200"),
        ("POST", "/sessions/a/clicks", b'{"item": 1, "k": "5"}', {}, 400, "field 'k'"),
        ("POST", "/sessions/a/clicks", b'{"item": NaN}', {}, 400, "NaN is not a JSON number"),
        (
            "POST",
            "/sessions/a/clicks",
            b'{"item": "' + b"x" * 10_100 + b'"}',
            {},
            413,
            "10,000-byte",
        ),
        ("GET", "/sessions/a/recommendations?k=x", None, {}, 400, "query parameter 'k'"),
        ("GET", "/sessions/never/recommendations", None, {}, 404, "no live session 'never'"),
        (
            "POST",
            "/invocations",
            b'{"dataframe_records": [{"foo": [1]}]}',
            {},
            400,
            "missing inputs",
        ),
        (
            "POST",
            "/invocations",
            b'{"dataframe_records": [{"items": ["a"]}]}',
            {},
            400,
            "Array(long)",
        ),
        ("POST", "/invocations", b'{"inputs": [[1, 2]]}', {}, 400, "dataframe_records"),
        ("POST", "/invocations", b"[[1]]", {"Content-Type": "text/plain"}, 415, "content type"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_reason(
    http: Http, method: str, path: str, raw: bytes | None, headers: dict[str, str], status: int,
    reason: str,
) -> None:  # fmt: skip
    got_status, answer = http.call(method, path, raw=raw, **headers)
    assert got_status == status
    assert isinstance(answer, dict) and reason in answer["message"], answer
    assert "Traceback" not in json.dumps(answer)


def test_unknown_items_are_reported_and_keep_the_state(
    http: Http, rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    first = http.call("POST", "/sessions/u/clicks", {"item": "no-such-item", "k": 3})[1]
    assert first["fallback"] == "popular" and first["unknown"] == ["no-such-item"]
    a = sessions[2][0]
    http.call("POST", "/sessions/u/clicks", {"item": a})
    status, answer = http.call("POST", "/sessions/u/clicks", {"item": 987654321, "k": 5})
    assert status == 200 and answer["unknown"] == [987654321]
    assert_same(Recommendation(**{**answer, "unknown": []}), rec.recommend([a], k=5), LIVE_ATOL)


def test_metrics_are_prometheus_text_with_routes_errors_and_sessions(http: Http) -> None:
    http.call("POST", "/sessions/m/clicks", {"item": 1})
    http.call("POST", "/sessions/m/clicks", raw=b"{")
    status, text = http.call("GET", "/metrics")
    assert status == 200
    lines = text.splitlines()
    click = 'route="/sessions/{session_id}/clicks",method="POST"'
    assert f'recsys_live_requests_total{{{click},status="200"}} 1' in lines
    assert f'recsys_live_requests_total{{{click},status="400"}} 1' in lines
    assert 'recsys_live_errors_total{route="/sessions/{session_id}/clicks"} 1' in lines
    assert (
        'recsys_live_request_duration_seconds_count{route="/sessions/{session_id}/clicks"} 2'
        in lines
    )
    assert "recsys_live_sessions 1" in lines and "recsys_live_swaps_total 0" in lines
    assert "# TYPE recsys_live_request_duration_seconds histogram" in lines
    inf = [ln for ln in lines if 'clicks",le="+Inf"' in ln]
    assert inf == [
        'recsys_live_request_duration_seconds_bucket{route="/sessions/{session_id}/clicks",le="+Inf"} 2'
    ]


# --- model roll-over -----------------------------------------------------------------------------


def _register(model: Path, name: str) -> str:
    """Log a model file as the project's pyfunc and register it; returns its version."""
    import mlflow

    from recsys.serving.mlflow_store import connect, log_pyfunc

    connect()
    with mlflow.start_run():
        info = log_pyfunc(model, [[1000, 1001]])
    return str(mlflow.register_model(info.model_uri, name).version)


def _random_model(path: Path, layers: list[int], seed: int, n_items: int = 60) -> Path:
    network = GRU4Rec(n_items, ModelConfig.model_validate({"layers": layers}), seed=seed)
    ids = list(range(1000, 1000 + n_items))
    TrainedModel(network, ItemIndex.of(ids, [float(i % 5) for i in ids])).save(path)
    return path


def test_model_swap_under_load_fails_no_request_and_replays_sessions(
    tmp_path: Path, mlflow_store: str, serve_app: Any
) -> None:
    from mlflow import MlflowClient

    name = "gru4rec-swap"
    v1 = _register(_random_model(tmp_path / "v1" / "model.pt", [16], 1), name)
    v2 = _register(_random_model(tmp_path / "v2" / "model.pt", [24, 8], 2), name)
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", v1)
    service = build_service(f"models:/{name}@champion", LiveOptions(poll_seconds=0))
    http = serve_app(service)
    assert http.call("GET", "/health")[1]["version"] == v1

    statuses: list[int] = []
    clicks: dict[str, list[int]] = {}
    stop = threading.Event()

    def client_loop(c: int) -> None:  # bounded: stops at `stop` or after 400 clicks
        for n in range(400):
            if stop.is_set():
                return
            item = 1000 + (c * 7 + n * 3) % 60
            status, _ = http.call("POST", f"/sessions/c{c}/clicks", {"item": item, "k": 5})
            statuses.append(status)
            clicks.setdefault(f"c{c}", []).append(item)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    client.set_registered_model_alias(name, "champion", v2)
    status, outcome = http.call("POST", "/admin/reload")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert status == 200 and outcome["swapped"] and outcome["version"] == v2, outcome
    assert statuses and set(statuses) == {200}  # no request failed around the swap
    assert http.call("GET", "/health")[1]["version"] == v2
    # every session survived, now on the new model: its kept clicks replayed into v2
    new = SessionRecommender.load(tmp_path / "v2" / "model.pt")
    for sid, items in clicks.items():
        status, answer = http.call("GET", f"/sessions/{sid}/recommendations?k=5")
        assert status == 200
        assert_same(Recommendation(**answer), new.recommend(items, k=5), LIVE_ATOL)
    metrics = http.call("GET", "/metrics")[1]
    assert "recsys_live_swaps_total 1" in metrics.splitlines()
    assert f"recsys_live_model_version {v2}" in metrics.splitlines()
    assert http.call("POST", "/admin/reload")[1] == {"swapped": False, "version": v2}


# --- end to end through the CLI ------------------------------------------------------------------


def test_cli_service_answers_real_sessions_click_by_click_as_the_library(
    trained: tuple[PreparedDataset, Path], rec: SessionRecommender, tmp_path: Path
) -> None:
    """`recsys serve-live` as a subprocess on a free loopback port, stopped by its PID."""
    port = free_port()
    log = tmp_path / "live.log"
    command = ["-m", "pipelines.cli", "serve-live", "-m", str(trained[1]), "-p", str(port)]
    proc = start_server([sys.executable, *command], {**os.environ, **QUIET}, log, ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        http = Http(url)
        sessions = real_sessions(trained[0], 30)
        for s, session in enumerate(sessions):
            for t, item in enumerate(session):
                status, answer = http.call("POST", f"/sessions/e{s}/clicks", {"item": item})
                assert status == 200, answer
                expected = expected_after(rec, session[: t + 1], 20)
                assert_same(Recommendation(**answer), expected, LIVE_ATOL)
        assert http.call("GET", "/health")[1]["sessions"] == len(sessions)
    finally:
        stop_server(proc)
    assert proc.returncode is not None
    assert "Traceback" not in log.read_text()


def test_cli_refuses_a_missing_model_or_a_taken_port_in_one_line(
    trained: tuple[PreparedDataset, Path], tmp_path: Path, mlflow_store: str
) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    uri, port = "models:/gru4rec-none@champion", str(free_port())
    missing = run_cli("serve-live", "-m", uri, "-p", port, env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: models:/gru4rec-none@champion: no such registered model version; "
        "run `recsys pipeline -c CONFIG` (or `recsys register`) first"
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = run_cli("serve-live", "-m", str(trained[1]), "-p", str(port), env=env)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"error: cannot serve on 127.0.0.1:{port}: Address already in use"
    ]
