"""The benchmarks' load generator against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.load_gen import run_clients


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn
    seen: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(("POST", self.path, body))
        if self.path.startswith("/fail"):
            self._answer(500, b'{"error": "no"}')
        elif self.path.startswith("/drop"):
            self.close_connection = True  # hang up without an answer
        else:
            time.sleep(0.002)
            self._answer(200, json.dumps({"echo": body.decode()}).encode())

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def port() -> Iterator[int]:
    _Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _maker(prefix: str, c: int):  # noqa: ANN202
    return lambda n: ("POST", f"/{prefix}/{c}/{n}", json.dumps({"c": c, "n": n}).encode())


def test_closed_loop_clients_stop_at_the_request_cap_with_every_body_delivered(port: int) -> None:
    result = run_clients(port, [_maker("ok", c) for c in range(4)], 10.0, max_requests=40)
    assert result["errors"] == 0 and result["hung_clients"] == 0
    assert len(result["samples"]) == 40 and min(result["samples"]) >= 2.0  # the server's sleep
    bodies = sorted(json.loads(b)["n"] for _, p, b in _Handler.seen if p.startswith("/ok/0/"))
    assert bodies == list(range(10))


def test_paced_clients_send_on_schedule_and_count_latency_from_it(port: int) -> None:
    result = run_clients(port, [_maker("ok", c) for c in range(5)], 1.0, pace_s=0.1)
    assert result["errors"] == 0
    assert 40 <= len(result["samples"]) <= 55  # 5 clients x 10 sends in a second
    assert 0.95 <= result["elapsed"] < 1.5


def test_error_answers_and_dropped_connections_count_as_errors_and_reconnect(port: int) -> None:
    makers = [_maker("fail", 0), _maker("drop", 1), _maker("ok", 2)]
    result = run_clients(port, makers, 10.0, max_requests=30)
    assert result["errors"] == 20 and len(result["samples"]) == 10
    assert sum(p.startswith("/drop/") for _, p, _ in _Handler.seen) == 10  # each one reconnected


def test_a_rejected_body_is_an_error(port: int) -> None:
    result = run_clients(
        port, [_maker("ok", 0)], 10.0, max_requests=5, accept=lambda body: b"never" in body
    )
    assert result["errors"] == 5 and result["samples"] == []


def test_during_runs_while_the_clients_do(port: int) -> None:
    counts: list[int] = []
    result = run_clients(
        port,
        [_maker("ok", 0)],
        1.0,
        pace_s=0.05,
        during=lambda: (time.sleep(0.5), counts.append(len(_Handler.seen))),
    )
    assert 3 <= counts[0] < len(result["samples"])
