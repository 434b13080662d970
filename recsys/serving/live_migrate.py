"""A model roll-over in progress: every held session's state on the next model, computed by
the live service's worker between two batches, then one atomic swap.

A background thread used to replay every held session while the worker kept answering. Its
GEMMs took the memory bandwidth the worker's batches stream the catalogue through (a batch ran
1.9x slower beside one) and its Python took the GIL from them (2.7x), so the requests of those
seconds made the tail: p99 52.9 ms across a swap, 19.4 ms without (``recsys bench --only
serve-live``). Now the worker, which owns the sessions, replays them itself: one GRU step of
``MIGRATE_CHUNK`` sessions at a time (~1.5 ms for 512 units), while its queue is empty, and at
least one step every ``GUARD_S`` under saturation, so a roll-over always ends. Sessions clicked
after their replay are replayed again in another round; the swap itself replays the last few
(at most ``FINAL_STALE``, or more when a round no longer halves them) and moves every session
to the new model. Only loading the model stays on a background thread.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Hashable
from concurrent.futures import Future
from typing import Any

import torch

from recsys.serving.live_store import KeptSession, SessionStore, replay_states, replay_steps
from recsys.serving.recommender import SessionRecommender

MIGRATE_CHUNK = 32  # sessions per replay step: the longest a request can wait behind one
SLICE_S = 0.002  # an idle worker replays for up to this long before looking at its queue
GUARD_S = 0.010  # a saturated worker still runs one replay step after each such interval
FINAL_STALE = 16  # few enough to replay inside the swap itself
MAX_ROUNDS = 6  # then the swap replays whatever is left, however many

# per session id: the session object, its click count when replayed, its state and indices
Replayed = tuple[KeptSession, int, torch.Tensor | None, list[int]]


class Migration:
    """One roll-over: the worker calls ``advance`` between batches until it returns True, then
    ``apply`` in the same turn. ``clicked`` records the sessions the worker steps meanwhile."""

    def __init__(
        self,
        recommender: SessionRecommender,
        label: Any,
        future: Future[Any],
        store: SessionStore[KeptSession],
    ) -> None:
        self.new = recommender
        self.label = label
        self.future = future
        self.done: dict[Hashable, Replayed] = {}
        self.clicked: set[Hashable] = set()
        self.rounds = 0
        self._size = 0  # sessions in the current round
        self.last_step = time.perf_counter()
        self._work = self._start(list(store.items()))

    def advance(self, store: SessionStore[KeptSession]) -> bool:
        """One replay step; True when what is left is few enough for the swap to replay."""
        self.last_step = time.perf_counter()
        try:
            next(self._work)
            return False
        except StopIteration:
            pass
        now = store.clock()
        held = [(sid, store.peek(sid, now)) for sid in self.clicked]
        stale = [(sid, s) for sid, s in held if s is not None and not self._current(sid, s)]
        if len(stale) <= FINAL_STALE or self.rounds >= MAX_ROUNDS or 2 * len(stale) > self._size:
            return True  # few left, or a round that no longer halves them: clicked too often
        self._work = self._start(stale)
        return False

    def apply(self, store: SessionStore[KeptSession]) -> dict[str, Any]:
        """Every held session onto the new model at once; those changed since their replay
        (or never replayed) are replayed here."""
        moves: list[tuple[KeptSession, torch.Tensor | None, list[int]]] = []
        stale: list[KeptSession] = []
        for sid, session in store.items():
            done = self.done.get(sid)
            if done is not None and self._current(sid, session):
                moves.append((session, done[2], done[3]))
            else:
                stale.append(session)
        seen = [self.new.to_indices(list(s.clicks))[0] for s in stale]
        states = replay_states(self.new.model, seen)
        moves += zip(stale, states, seen, strict=True)
        for session, state, indices in moves:  # nothing here can fail: all sessions or none
            session.state, session.seen = state, indices
        return {"replayed": len(self.done), "replayed_at_swap": len(stale), "rounds": self.rounds}

    def _current(self, sid: Hashable, session: KeptSession) -> bool:
        """Replayed as it is now: the same object (not a session restarted under its id) with
        no click since."""
        done = self.done.get(sid)
        return done is not None and done[0] is session and done[1] == session.changes

    def _start(self, todo: list[tuple[Hashable, KeptSession]]) -> Generator[None, None, None]:
        """A new round, counted and with ``clicked`` emptied now, when it is decided (a
        generator's body would only run at its first step, and forget the clicks between)."""
        self.rounds += 1
        self._size = len(todo)
        self.clicked = set()
        todo.sort(key=lambda pair: len(pair[1].clicks))
        return self._replay(todo)

    def _replay(self, todo: list[tuple[Hashable, KeptSession]]) -> Generator[None, None, None]:
        """A round's work: the sessions in chunks of similar length, one GRU step per ``next``.
        Each chunk's indices and click counts are read when it starts, on the worker."""
        for start in range(0, len(todo), MIGRATE_CHUNK):
            part = todo[start : start + MIGRATE_CHUNK]
            counts = [s.changes for _, s in part]
            seen = [self.new.to_indices(list(s.clicks))[0] for _, s in part]
            states = yield from replay_steps(self.new.model, seen, MIGRATE_CHUNK)
            for (sid, s), count, indices, state in zip(part, counts, seen, states, strict=True):
                self.done[sid] = (s, count, state, indices)
