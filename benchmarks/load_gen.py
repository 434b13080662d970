"""One load generator for the REST benchmarks: client threads on keep-alive loopback
connections, closed loop or paced, bounded by a deadline and a request cap.

Closed loop (no ``pace_s``): each client sends its next request as soon as the last one
returns, so the server is saturated and latency is mostly queueing. Paced: each client sends
every ``pace_s`` seconds (phases spread over the clients) and latency counts from the
*scheduled* send, so a stalled server is not excused by clients that waited for it (no
coordinated omission).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.serve import HOST

Request = tuple[str, str, bytes]  # method, path, body
Maker = Callable[[int], Request]  # a client's n-th request


def run_clients(
    port: int,
    makers: list[Maker],
    seconds: float,
    pace_s: float | None = None,
    max_requests: int = 1_000_000,
    accept: Callable[[bytes], bool] = lambda payload: True,
    during: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One thread per maker until the deadline or the cap; a request counts when it answers
    200 and ``accept`` takes its body. ``during`` runs on the calling thread meanwhile.
    Returns the latencies (ms), counts and the elapsed seconds."""
    clients = len(makers)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    per_client = max(1, max_requests // clients)
    gate = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        gate.wait()
        due = time.perf_counter() + (c / clients * pace_s if pace_s else 0.0)
        n = 0
        while time.monotonic() < deadline[0] and n < per_client:
            method, path, body = makers[c](n)
            n += 1
            if pace_s:
                time.sleep(max(0.0, due - time.perf_counter()))
                t0, due = due, due + pace_s
            else:
                t0 = time.perf_counter()
            try:
                conn.request(method, path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()  # always: the keep-alive connection needs it read
                ok = response.status == 200 and accept(payload)
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
    gate.wait()
    if during is not None:
        during()
    for th in threads:
        th.join(timeout=seconds + 60)
    elapsed = time.monotonic() - began
    return {
        "samples": [x for per in latencies for x in per],
        "errors": sum(errors),
        "elapsed": elapsed,
        "hung_clients": sum(th.is_alive() for th in threads),
    }
