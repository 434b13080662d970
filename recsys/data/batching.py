"""Session-parallel mini-batches (GRU4Rec's way of batching sessions of unequal length).

``batch_size`` slots each hold one session. Every step feeds the current item of each slot and
targets the next item of the same session. When a session runs out of targets, the next session
(in start-time order) takes the slot and the slot's hidden state must be reset to zero; when no
session is left to take a slot, the slot is removed and the batch shrinks. No padding, no
truncated windows, and any number of sessions works with any batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.data.schema import ITEM_IDX, SESSION


@dataclass(frozen=True)
class SessionArrays:
    """Sessions as one flat item array plus offsets: session k is ``items[offsets[k]:offsets[k+1]]``."""

    items: np.ndarray  # (n_events,) int64
    offsets: np.ndarray  # (n_sessions + 1,) int64

    @property
    def n_sessions(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        """Training events = (input, target) pairs = clicks minus one per session."""
        return int(len(self.items) - self.n_sessions)

    def session(self, k: int) -> np.ndarray:
        return self.items[self.offsets[k] : self.offsets[k + 1]]

    def sessions(self) -> list[np.ndarray]:
        return np.split(self.items, self.offsets[1:-1]) if self.n_sessions else []


def session_arrays(events: pl.DataFrame) -> SessionArrays:
    """Flatten events (already ordered by session start, session, time) into arrays."""
    items = events[ITEM_IDX].to_numpy().astype(np.int64, copy=True)
    sessions = events[SESSION].to_numpy()
    if len(sessions) == 0:
        return SessionArrays(items, np.zeros(1, dtype=np.int64))
    starts = np.flatnonzero(np.concatenate(([True], sessions[1:] != sessions[:-1])))
    offsets = np.concatenate((starts, [len(items)])).astype(np.int64)
    return SessionArrays(items, offsets)


@dataclass(frozen=True)
class Step:
    """One mini-batch step.

    Apply ``keep`` (slots that survive from the previous step, or None if all do) to the hidden
    state first, then zero the rows in ``reset``; then feed ``inputs`` and predict ``targets``.
    """

    inputs: np.ndarray  # (B,) int64
    targets: np.ndarray  # (B,) int64
    reset: np.ndarray  # (B,) bool: slot starts a new session at this step
    keep: np.ndarray | None  # indices into the previous step's slots
    positions: np.ndarray | None = None  # (B,) the inputs' positions in ``SessionArrays.items``


def session_parallel_batches(
    data: SessionArrays, batch_size: int, start_session: int = 0
) -> Iterator[Step]:
    """Yield steps over all sessions (of length >= 2) in order, ``batch_size`` at a time."""
    offsets = data.offsets
    lengths = np.diff(offsets)
    order = np.flatnonzero(lengths >= 2)[start_session:]
    if len(order) == 0:
        return
    n_slots = min(batch_size, len(order))
    slot_session = order[:n_slots].copy()
    next_pos = n_slots
    cur = offsets[slot_session].copy()  # position of the current input
    end = offsets[slot_session + 1].copy()  # exclusive end of the slot's session
    reset = np.ones(n_slots, dtype=bool)
    keep: np.ndarray | None = None
    items = data.items
    while len(cur):
        yield Step(items[cur], items[cur + 1], reset, keep, cur)
        cur = cur + 1
        done = np.flatnonzero(cur + 1 >= end)
        reset = np.zeros(len(cur), dtype=bool)
        keep = None
        if len(done) == 0:
            continue
        n_new = min(len(done), len(order) - next_pos)
        if n_new:
            refill = done[:n_new]
            new_sessions = order[next_pos : next_pos + n_new]
            next_pos += n_new
            cur[refill] = offsets[new_sessions]
            end[refill] = offsets[new_sessions + 1]
            reset[refill] = True
        if n_new < len(done):
            alive = np.ones(len(cur), dtype=bool)
            alive[done[n_new:]] = False
            keep = np.flatnonzero(alive)
            cur, end, reset = cur[keep], end[keep], reset[keep]
