"""CPU and memory while the model trains, logged as MLflow system metrics (``system/...``).

The train run is opened after the training, so that a failed training leaves no run behind;
MLflow's own monitor needs an open run, so this samples in a thread during the work and the
step logs the samples, with their own timestamps, once its run is open. The names are MLflow's,
so the run page's System metrics tab charts them. Needs psutil; without it nothing is sampled.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

PREFIX = "system/"


class SystemSampler:
    """``with SystemSampler(10.0) as s: work()``; then ``s.samples``: (ms, {name: value})."""

    def __init__(self, interval_s: float, enabled: bool = True) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[int, dict[str, float]]] = []
        self._psutil = _psutil() if enabled else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Whether samples are taken (switched on and psutil importable)."""
        return self._psutil is not None

    def __enter__(self) -> SystemSampler:
        if self._psutil is not None:
            self._process = self._psutil.Process()
            self._cpu = self._cpu_times()
            self._thread = threading.Thread(target=self._run, name="recsys-system-metrics")
            self._thread.daemon = True
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if exc_type is None:
                self._safe_sample()  # the state at the end of the work

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self._safe_sample():
            pass

    def _safe_sample(self) -> bool:
        """A sample; False (and no more samples) if psutil fails: the training goes on, and a
        thread's traceback must not reach the terminal."""
        try:
            self._sample()
        except Exception:  # noqa: BLE001 - system metrics are a nicety, never a failure
            self._psutil = None
            return False
        return True

    def _cpu_times(self) -> tuple[float, float]:
        """(busy, total) CPU seconds of the whole machine so far."""
        times = self._psutil.cpu_times()
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)  # Linux counts guest time in user
        return total - idle, total

    def _cpu_percent(self) -> float:
        """The machine's CPU use since the previous sample (all cores: 100 = all busy)."""
        (busy0, total0), (busy1, total1) = self._cpu, self._cpu_times()
        self._cpu = (busy1, total1)
        return 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0

    def _sample(self) -> None:
        ps = self._psutil
        if ps is None:
            return
        memory = ps.virtual_memory()
        values = {
            "cpu_utilization_percentage": self._cpu_percent(),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
            "process_memory_rss_megabytes": self._process.memory_info().rss / 1e6,
        }
        named = {PREFIX + k: round(v, 1) for k, v in values.items()}
        self.samples.append((int(time.time() * 1000), named))


def _psutil() -> Any | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil
