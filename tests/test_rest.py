"""The REST server: `mlflow models serve` on the champion registered by the real pipeline.

One server per module (it takes ~7 s to start): the pipeline trains and registers the tiny
synthetic model in a private SQLite store, the server runs as a real subprocess on a free
loopback port, and the last test stops it and checks that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from pipelines.serve import free_port, start_server, stop_server, wait_ready
from recsys.data.schema import ITEM, SESSION
from recsys.serving.recommender import SessionRecommender
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow

NAME = "tiny"
MODEL_URI = f"models:/gru4rec-{NAME}@champion"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    env: dict[str, str]

    def post(self, body: bytes | str, content_type: str = "application/json") -> tuple[int, Any]:
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(
            f"{self.url}/invocations", data=data, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            try:
                return err.code, json.loads(text)
            except json.JSONDecodeError:
                return err.code, text

    def predict(self, sessions: list[list[Any]], **params: Any) -> list[dict[str, Any]]:
        body = {"dataframe_records": [{"items": s} for s in sessions], "params": params}
        status, answer = self.post(json.dumps(body))
        assert status == 200, answer
        return answer["predictions"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("rest")
    (workdir / "mlops").mkdir()
    env = {
        **QUIET,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlops' / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
    }
    config = write_config(workdir / "tiny.yaml", tiny_config(workdir / "data", name=NAME))
    proc = run_cli("pipeline", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"load it with: {MODEL_URI}" in proc.stdout

    # `recsys serve` (what `make serve` runs) execs `mlflow models serve` in its own process
    # group (uvicorn is its child), so the last test can check that a SIGTERM stops them all.
    port = free_port()
    log = workdir / "server.log"
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config)]
    server_proc = start_server([*command, "--port", str(port)], {**os.environ, **env}, log, ROOT)
    srv = Server(f"http://127.0.0.1:{port}", server_proc, log, workdir, env)
    try:
        wait_ready(srv.url, server_proc, log)
        yield srv
    finally:
        if group_alive(server_proc.pid):  # a failed test left it running: stop it anyway
            stop_server(server_proc)


@pytest.fixture(scope="module")
def library(server: Server) -> SessionRecommender:
    """The same registered model, loaded through the library from the same store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server.env["MLFLOW_TRACKING_URI"])
        return SessionRecommender.load(MODEL_URI)


@pytest.fixture(scope="module")
def sessions(server: Server) -> list[list[int]]:
    test = pl.read_parquet(server.workdir / "data" / NAME / "prepared" / "test.parquet")
    grouped = test.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM))
    return [s for s in grouped[ITEM].to_list() if len(s) >= 3][:6]


def assert_matches(answer: dict[str, Any], expected: Any) -> None:
    """Same items and scores as the library (floats may differ in the last bits)."""
    assert answer["items"] == expected.items
    np.testing.assert_allclose(answer["scores"], expected.scores, rtol=1e-5, atol=1e-6)
    assert answer["unknown"] == expected.unknown
    assert answer["fallback"] == expected.fallback


def test_valid_requests_get_the_library_ranking(
    server: Server, library: SessionRecommender, sessions: list[list[int]]
) -> None:
    got = server.predict(sessions, k=5)
    assert len(got) == len(sessions)
    for answer, expected in zip(got, library.recommend_batch(sessions, k=5), strict=True):
        assert len(answer["items"]) == 5
        assert answer["scores"] == sorted(answer["scores"], reverse=True)
        assert_matches(answer, expected)
    # the default k (20) and the other payload layout
    body = {"dataframe_split": {"columns": ["items"], "data": [[sessions[0]]]}}
    status, answer = server.post(json.dumps(body))
    assert status == 200
    assert_matches(answer["predictions"][0], library.recommend(sessions[0], k=20))


def test_exclude_seen_param(
    server: Server, library: SessionRecommender, sessions: list[list[int]]
) -> None:
    (answer,) = server.predict([sessions[1]], k=10, exclude_seen=True)
    assert not set(answer["items"]) & set(sessions[1])
    assert_matches(answer, library.recommend(sessions[1], k=10, exclude_seen=True))


def test_unknown_items_are_skipped_and_reported(
    server: Server, library: SessionRecommender, sessions: list[list[int]]
) -> None:
    a, b = sessions[2][:2]
    (answer,) = server.predict([[a, 987_654_321, b, -3]], k=5)
    assert answer["unknown"] == [987_654_321, -3]
    expected = library.recommend([a, b], k=5)
    assert_matches({**answer, "unknown": []}, expected)


def test_an_empty_session_gets_popular_items(server: Server, library: SessionRecommender) -> None:
    empty, unknown = server.predict([[], [11, 12]], k=4)
    popular = library.popular(4)
    assert_matches(empty, popular)
    assert empty["fallback"] == "popular"
    assert unknown["fallback"] == "popular" and unknown["unknown"] == [11, 12]
    assert unknown["items"] == popular.items


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        ("this is not json", "application/json", 400, "valid JSON"),
        (
            '{"dataframe_records": [{"foo": [1, 2]}]}',
            "application/json",
            400,
            "missing inputs ['items']",
        ),
        ('{"dataframe_records": [{"items": ["a", "b"]}]}', "application/json", 400, "Array(long)"),
        ('{"dataframe_records": [{"items": [1.5]}]}', "application/json", 400, "float64 to int64"),
        ('{"dataframe_records": [{"items": 7}]}', "application/json", 400, "Array(long)"),
        (
            '{"dataframe_records": [{"items": [1]}], "params": {"k": 0}}',
            "application/json",
            400,
            "params.k must be a positive integer, got 0",
        ),
        (
            '{"dataframe_records": [{"items": [1]}], "params": {"k": "x"}}',
            "application/json",
            400,
            "'k'",
        ),
        ('{"items": [1]}', "text/plain", 415, "content types"),
    ],
)
def test_malformed_requests_get_4xx_with_a_reason(
    server: Server, body: str, content_type: str, status: int, reason: str
) -> None:
    got_status, answer = server.post(body, content_type)
    assert got_status == status
    message = answer["message"] if isinstance(answer, dict) else answer
    assert reason in message
    assert "Traceback" not in json.dumps(answer)


def test_the_server_stops_cleanly(server: Server) -> None:
    """SIGTERM to `mlflow models serve` ends it and its uvicorn child; nothing is left."""
    assert server.proc.poll() is None  # it survived every request above
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) is not None
    deadline = time.monotonic() + 10
    while group_alive(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(server.proc.pid), "a process of the server is still running"
    assert "Shutting down" in server.log.read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/ping", timeout=2)


def test_serving_a_model_that_is_not_registered_is_one_clear_line(mlflow_store: str) -> None:
    proc = run_cli("serve", "--model", "models:/nobody-registered-this@champion", "--port", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: models:/nobody-registered-this@champion: no such registered model version; "
        "run `recsys pipeline -c CONFIG` (or `recsys register`) first"
    ]


def test_serving_on_a_busy_port_is_one_clear_line(
    trained: tuple[Any, Path], mlflow_store: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--model", str(trained[1]), "--port", str(port))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot serve on 127.0.0.1:{port}: ")
    assert "Traceback" not in proc.stdout + proc.stderr
