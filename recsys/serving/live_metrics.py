"""The live service's counters, rendered in the Prometheus text exposition format (v0.0.4).

Written here rather than taken from a client library: a handful of counters, one histogram
and some gauges do not justify a dependency. Names follow Prometheus conventions
(``_total`` counters, ``_seconds`` histograms with cumulative ``le`` buckets and ``+Inf``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping

# Latency bucket bounds in seconds: a click is ~1 ms, a saturated queue tens of ms.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "recsys_live_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Metrics:
    """Requests and errors by route and status, request latency by route; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, method, status)] += 1
            buckets = self._buckets.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[route] += seconds
            self._counts[route] += 1

    def render(self, gauges: Mapping[str, tuple[str, float]], info: Mapping[str, str]) -> str:
        """The exposition text: the counters above, then ``gauges`` (name -> (help, value))
        and one ``model_info`` series labelled with ``info``."""
        lines = [
            f"# HELP {PREFIX}requests_total HTTP requests by route, method and status.",
            f"# TYPE {PREFIX}requests_total counter",
        ]
        errors: dict[str, int] = defaultdict(int)
        with self._lock:
            requests = sorted(self._requests.items())
            buckets = {r: list(b) for r, b in self._buckets.items()}
            sums, counts = dict(self._sums), dict(self._counts)
        for (route, method, status), n in requests:
            labels = f'route="{_escape(route)}",method="{method}",status="{status}"'
            lines.append(f"{PREFIX}requests_total{{{labels}}} {n}")
            if status >= 400:
                errors[route] += n
        lines += [
            f"# HELP {PREFIX}errors_total HTTP answers with a 4xx or 5xx status, by route.",
            f"# TYPE {PREFIX}errors_total counter",
        ]
        lines += [
            f'{PREFIX}errors_total{{route="{_escape(r)}"}} {n}' for r, n in sorted(errors.items())
        ]
        name = f"{PREFIX}request_duration_seconds"
        lines += [
            f"# HELP {name} Time from request to answer, by route.",
            f"# TYPE {name} histogram",
        ]
        for route in sorted(buckets):
            label = f'route="{_escape(route)}"'
            for bound, n in zip(BUCKETS, buckets[route], strict=True):
                lines.append(f'{name}_bucket{{{label},le="{bound}"}} {n}')
            lines.append(f'{name}_bucket{{{label},le="+Inf"}} {counts[route]}')
            lines.append(f"{name}_sum{{{label}}} {sums[route]!r}")
            lines.append(f"{name}_count{{{label}}} {counts[route]}")
        for key, (help_text, value) in gauges.items():
            kind = "counter" if key.endswith("_total") else "gauge"
            lines += [
                f"# HELP {PREFIX}{key} {help_text}",
                f"# TYPE {PREFIX}{key} {kind}",
                f"{PREFIX}{key} {_number(value)}",
            ]
        labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in info.items())
        lines += [
            f"# HELP {PREFIX}model_info The model being served (value always 1).",
            f"# TYPE {PREFIX}model_info gauge",
            f"{PREFIX}model_info{{{labels}}} 1",
        ]
        return "\n".join(lines) + "\n"
