"""A REST server one request cannot stall (issue #19): ``recsys serve`` caps the request body
(413, unread) and the session length (cut to its most recent clicks, said in ``truncated``).

One server for the module, on a free loopback port, with small limits given on the command line
(``--max-body-bytes``, ``--max-session-clicks``); the tiny synthetic pipeline registers its model
in a private SQLite store.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.serve import free_port, start_server, stop_server, wait_ready
from recsys.serving.recommender import SessionRecommender
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow

MAX_BODY = 200_000
MAX_CLICKS = 50
MODEL_URI = "models:/gru4rec-tiny@champion"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def post(url: str, body: bytes) -> tuple[int, Any, float]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    return status, json.loads(text), time.perf_counter() - start


def body(sessions: list[list[int]], **params: Any) -> bytes:
    return json.dumps(
        {"dataframe_records": [{"items": s} for s in sessions], "params": params}
    ).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("rest-limits")
    env = {**QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    raw = tiny_config(workdir / "data", train={"epochs": 1, "max_steps": 40})
    config = write_config(workdir / "tiny.yaml", raw)
    proc = run_cli("pipeline", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    log = workdir / "server.log"
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config)]
    command += ["--port", str(port), "--max-body-bytes", str(MAX_BODY)]
    command += ["--max-session-clicks", str(MAX_CLICKS)]
    server_proc = start_server(command, {**os.environ, **env}, log, ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server_proc, log)
        yield {"url": url, "proc": server_proc, "env": env, "log": log}
    finally:
        stop_server(server_proc)


@pytest.fixture(scope="module")
def library(server: dict[str, Any]) -> SessionRecommender:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server["env"]["MLFLOW_TRACKING_URI"])
        return SessionRecommender.load(MODEL_URI)


def test_an_8_mb_body_gets_413_at_once_and_memory_stays_flat(server: dict[str, Any]) -> None:
    big = body([[1000 + i % 300 for i in range(1_400_000)]])  # one session of 1.4M ids
    assert len(big) > 8_000_000
    status, answer, _ = post(server["url"], big)  # the first request warms the server up
    assert status == 413 and answer["error_code"] == "REQUEST_TOO_LARGE"
    assert f"{MAX_BODY:,} bytes" in answer["message"]
    before = rss_kib(server["proc"].pid)
    seconds = []
    for _ in range(100):
        status, _, took = post(server["url"], big)
        assert status == 413
        seconds.append(took)
    grown_mib = (rss_kib(server["proc"].pid) - before) / 1024
    assert grown_mib < 20, f"the server grew by {grown_mib:.1f} MiB over 100 refused bodies"
    assert statistics.median(seconds) < 0.1, f"median {statistics.median(seconds):.3f} s"
    assert "Traceback" not in server["log"].read_text()


def test_a_chunked_body_over_the_cap_gets_413(server: dict[str, Any]) -> None:
    host, port = server["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body([[1, 2, 3] * 40_000])
    assert len(data) > MAX_BODY
    chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))
    conn.request(
        "POST",
        "/invocations",
        body=chunks,
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error_code"] == "REQUEST_TOO_LARGE"
    conn.close()


def test_a_long_session_is_cut_to_its_most_recent_clicks_and_says_so(
    server: dict[str, Any], library: SessionRecommender
) -> None:
    session = [1 + (i * 7) % 300 for i in range(MAX_CLICKS + 120)]
    status, answer, _ = post(server["url"], body([session, session[:5]], k=5))
    assert status == 200, answer
    long, short = answer["predictions"]
    assert long["truncated"] == 120 and short["truncated"] == 0
    expected = library.recommend(session[-MAX_CLICKS:], k=5)
    assert long["items"] == expected.items


def test_a_body_under_the_cap_is_served(server: dict[str, Any]) -> None:
    status, answer, _ = post(server["url"], body([[1, 2, 3]], k=3))
    assert status == 200 and len(answer["predictions"][0]["items"]) == 3
