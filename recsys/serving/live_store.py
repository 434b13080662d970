"""Live sessions for the REST service: the bounded store and the batched GRU arithmetic.

The store keeps, per session, the GRU state of every layer after its last known click, the
indices of its kept known clicks (for ``exclude_seen`` and the repeat readout) and the original
ids of its last ``max_clicks`` clicks. The ids, never indices, are what a model roll-over
replays into the new model, whose catalogue may differ. One thread (the micro-batcher) owns a
store; it holds no lock of its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from recsys.core.errors import RecsysError
from recsys.model.gru4rec import GRU4Rec, pad_sessions

REPLAY_CHUNK = 1024  # sessions replayed in one padded pass (bounds the gate tensor)


@dataclass(slots=True)
class KeptSession:
    """One live session. ``state`` is None until its first known click. Slots and plain lists:
    at 100,000 sessions the per-object overhead is what the memory goes on."""

    clicks: list[Any]  # original ids of the last max_clicks clicks, known or not
    state: torch.Tensor | None = None  # (sum(state_sizes),): every layer's state, layer 0 first
    seen: list[int] = field(default_factory=list)  # current model's indices of kept known clicks
    touched: float = 0.0
    changes: int = 0  # clicks so far: a swap replays again a session clicked since its snapshot


class Touched(Protocol):
    touched: float


S = TypeVar("S", bound=Touched)


class SessionStore(Generic[S]):
    """Sessions in last-touched order, at most ``capacity``, each forgotten after ``ttl`` idle:
    the one eviction rule of ``LiveSessions`` (whose values are its own) and the live service
    (``KeptSession``, with ``get_or_start`` and ``keep``)."""

    def __init__(
        self,
        capacity: int = 100_000,
        ttl_seconds: float = 1800.0,
        max_clicks: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise RecsysError("the live-session store needs a capacity of at least 1")
        if ttl_seconds <= 0:
            raise RecsysError("the live-session TTL must be positive")
        if max_clicks < 1:
            raise RecsysError("a live session must keep at least 1 click")
        self.capacity = capacity
        self.ttl = ttl_seconds
        self.max_clicks = max_clicks
        self.clock = clock
        self._sessions: OrderedDict[Hashable, Any] = OrderedDict()
        self.evicted = 0  # dropped for capacity or idleness since creation

    def __len__(self) -> int:
        return len(self._sessions)

    def items(self) -> Iterator[tuple[Hashable, S]]:
        return iter(list(self._sessions.items()))

    def peek(self, session_id: Hashable, now: float) -> S | None:
        """The session if held and not expired, without touching it."""
        session = self._sessions.get(session_id)
        return session if session is not None and now - session.touched <= self.ttl else None

    def get(self, session_id: Hashable, now: float) -> S | None:
        """The live session (touched, moved to the end), or None if absent or expired."""
        session = self._sessions.pop(session_id, None)
        if session is not None and now - session.touched > self.ttl:
            self.evicted += 1
            session = None
        if session is not None:
            self.put(session_id, session, now)
        return session

    def get_or_start(self, session_id: Hashable, now: float) -> Any:
        session = self.get(session_id, now)
        if session is None:
            session = KeptSession([], touched=now)
            self.put(session_id, session, now)
        return session

    def put(self, session_id: Hashable, session: S, now: float) -> None:
        session.touched = now
        self._sessions[session_id] = session
        self._sessions.move_to_end(session_id)
        self._evict(now)

    def keep(self, session: KeptSession, item: Any, index: int | None) -> None:
        """Record a click: its id among the kept clicks, its index among the seen ones."""
        session.clicks.append(item)
        del session.clicks[: -self.max_clicks]
        if index is not None:
            session.seen.append(index)
            del session.seen[: -self.max_clicks]
        session.changes += 1

    def drop(self, session_id: Hashable) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def expire(self) -> int:
        """Forget the sessions idle past the TTL now (clicks do this too); returns how many."""
        before = self.evicted
        self._evict(self.clock())
        return self.evicted - before

    def _evict(self, now: float) -> None:
        """Only the head can be stale: the dict is in last-touched order."""
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) > self.capacity or now - oldest.touched > self.ttl:
                del self._sessions[oldest_id]
                self.evicted += 1
            else:
                break


def _split(model: GRU4Rec, states: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per-layer state (B, S_l) from kept states, zeros for sessions without one."""
    width = sum(model.state_sizes)
    rows = [s if s is not None else torch.zeros(width) for s in states]
    return list(torch.stack(rows).split(model.state_sizes, dim=1))


def step_states(
    model: GRU4Rec, states: Sequence[torch.Tensor | None], items: Sequence[int]
) -> torch.Tensor:
    """One step for many sessions at once: (B, sum(state_sizes)) states after ``items``."""
    with torch.inference_mode():
        gates = model.input_gates(torch.tensor(list(items), dtype=torch.int64))
        _, hidden = model.infer_step(gates, _split(model, states))
        return torch.cat(hidden, 1)


def output_of(model: GRU4Rec, state: torch.Tensor) -> torch.Tensor:
    """The network's output after a state: its last layer's output, the trailing columns for
    every cell (an LSTM layer keeps [c, h])."""
    return state[-model.layers[-1] :]


def replay_steps(
    model: GRU4Rec, sessions: Sequence[Sequence[int]], chunk: int = REPLAY_CHUNK
) -> Generator[None, None, list[torch.Tensor | None]]:
    """``replay_states`` one GRU step of one chunk at a time: it yields after each step, so a
    caller that must keep answering (the live service's worker during a roll-over) runs a
    step between two batches. Returns the states (the generator's value)."""
    out: list[torch.Tensor | None] = [None] * len(sessions)
    order = sorted((i for i, s in enumerate(sessions) if s), key=lambda i: len(sessions[i]))
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        padded, lengths = pad_sessions([np.asarray(sessions[i], np.int64) for i in rows])
        hidden = model.init_hidden(len(rows))
        for t in range(padded.shape[1]):
            with torch.inference_mode():  # per step: the mode must not span a yield
                _, new = model.infer_step(model.input_gates(padded[:, t]), hidden)
                live = (lengths > t).unsqueeze(1)
                hidden = [torch.where(live, n, h) for n, h in zip(new, hidden, strict=True)]
            yield
        with torch.inference_mode():
            states = torch.cat(hidden, 1)
            for row, i in enumerate(rows):
                out[i] = states[row].clone()
    return out


def replay_states(model: GRU4Rec, sessions: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
    """The kept state after each session's known clicks (item indices), from a zero state;
    None for a session with none. Sessions run in padded chunks of similar length."""
    steps = replay_steps(model, sessions)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value
