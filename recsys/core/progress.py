"""Progress reporting for long steps, on stderr so that stdout stays machine-readable.

A live bar on a terminal; on a pipe or in CI a line every few seconds, so logs stay short.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def _quiet() -> bool:
    return os.environ.get("RECSYS_QUIET", "") not in ("", "0")


class Progress:
    """A progress bar with free-form postfix fields (loss, events/s)."""

    def __init__(
        self,
        total: int | None,
        label: str,
        unit: str = "it",
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.count = 0
        self.fields: dict[str, str] = {}
        self.start = time.perf_counter()
        self._last = 0.0
        self._closed = False

    def update(self, n: int = 1, **fields: float | str) -> None:
        self.count += n
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._render(final=False)

    def _render(self, final: bool) -> None:
        if _quiet():
            return
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.count / self.total, 1.0)
            bar = "#" * int(frac * 24)
            head = f"{self.label} [{bar:<24}] {frac:6.1%} {self.count}/{self.total}"
        else:
            head = f"{self.label} {self.count} {self.unit}"
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        line = f"{head} {rate:,.0f} {self.unit}/s {elapsed:.1f}s {extra}".rstrip()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._render(final=True)


@contextmanager
def progress(total: int | None, label: str, unit: str = "it") -> Iterator[Progress]:
    bar = Progress(total, label, unit)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def step(label: str) -> Iterator[None]:
    """Announce a step and how long it took."""
    start = time.perf_counter()
    if not _quiet():
        print(f"{label} ...", file=sys.stderr, flush=True)
    yield
    if not _quiet():
        print(f"{label}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
