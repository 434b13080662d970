"""Micro-batching for the live service: concurrent requests become one GRU step and one
catalogue pass, and a model swap happens between two batches.

One worker thread owns the model and the session store, so no state needs a lock: request
handlers put operations on a queue and wait on a future. The worker takes the first waiting
operation, gathers what is queued and what arrives within ``window_s`` (default 0: only what
is queued; under load, everything that arrived during the last batch), up to ``max_batch``,
and runs them in arrival order. Consecutive clicks and reads of distinct sessions are scored together:
their answers are those of one-at-a-time scoring, because each session's step depends only on
its own state (the products are summed in another order: scores agree to float rounding).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from recsys.core.errors import RecsysError
from recsys.model.artifact import plain_id
from recsys.serving.live_migrate import GUARD_S, SLICE_S, Migration
from recsys.serving.live_store import SessionStore, output_of, step_states
from recsys.serving.recommender import Recommendation, SessionRecommender


class NoSession(RecsysError):
    """A read of a session the store does not hold (never clicked, ended or expired)."""


@dataclass(frozen=True)
class Click:
    session_id: Hashable
    item: Any
    k: int
    exclude_seen: bool


@dataclass(frozen=True)
class Read:  # the recommendations for a session's current state, without a click
    session_id: Hashable
    k: int
    exclude_seen: bool


@dataclass(frozen=True)
class End:
    session_id: Hashable


@dataclass(frozen=True)
class Stateless:  # /invocations: whole sessions, as `mlflow models serve` scores them
    sessions: list[list[Any]]
    k: int
    exclude_seen: bool


@dataclass(frozen=True)
class Migrate:  # a model roll-over: answered when every session is on the new model
    recommender: SessionRecommender
    label: Any  # what /health reports afterwards (the version)


_STOP = object()


class MicroBatcher:
    """The worker thread of the live service (see the module docstring)."""

    def __init__(
        self,
        recommender: SessionRecommender,
        store: SessionStore,
        window_s: float = 0.0,
        max_batch: int = 64,
        label: Any = None,
    ) -> None:
        self.rec = recommender
        self.store = store
        self.window_s = window_s
        self.max_batch = max_batch
        self.label = label
        self.swaps = 0
        self.batches = 0
        self.batched_ops = 0
        self.busy_s = 0.0  # time spent running batches (its rate is the worker's load)
        self._migration: Migration | None = None  # a roll-over in progress
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="live-batcher", daemon=True)
        self._thread.start()

    def submit(self, op: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((op, future))
        return future

    def call(self, op: Any, timeout: float = 60.0) -> Any:
        """Submit and wait (for callers on a thread of their own: tests, the model follower)."""
        return self.submit(op).result(timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    # --- the worker -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._next()
            if first is None:  # the queue was empty: a slice of the roll-over ran instead
                continue
            if first is _STOP:
                self._abandon()
                return
            batch = [first]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            self.batches += 1
            self.batched_ops += len(batch)
            began = time.perf_counter()
            self._run(batch)
            self.busy_s += time.perf_counter() - began
            if self._migration is not None and began - self._migration.last_step > GUARD_S:
                self._migrate(steps=1)  # saturated: the roll-over still moves on

    def _next(self) -> Any:
        """The next operation; with a roll-over in progress and nothing queued, None after
        running a slice of it (a request arriving meanwhile waits at most one replay step)."""
        if self._migration is None:
            return self._queue.get()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            self._migrate()
            return None

    def _migrate(self, steps: int = 0) -> None:
        """Replay steps for ``SLICE_S`` (or ``steps`` of them) or until a request is queued;
        the swap when the roll-over is done."""
        migration = self._migration
        assert migration is not None
        until = time.perf_counter() + SLICE_S
        ran = 0
        try:
            while not migration.advance(self.store):
                ran += 1
                if ran == steps or time.perf_counter() >= until or not self._queue.empty():
                    return
            outcome = migration.apply(self.store)
            self.rec, self.label = migration.new, migration.label
            self.swaps += 1
            self._migration = None
            migration.future.set_result(outcome)
        except Exception as exc:  # noqa: BLE001 - a failed roll-over keeps the old model
            self._migration = None
            migration.future.set_exception(exc)

    def _abandon(self) -> None:
        if self._migration is not None:
            self._migration.future.set_exception(RecsysError("the live service stopped"))
            self._migration = None

    def _run(self, batch: list[tuple[Any, Future[Any]]]) -> None:
        """In arrival order; a group of clicks/reads ends where a session comes back or another
        kind of operation arrives, so every session sees its operations in order."""
        group: list[tuple[Any, Future[Any]]] = []
        sessions: set[Hashable] = set()
        for op, future in batch:
            if isinstance(op, Click | Read) and op.session_id not in sessions:
                group.append((op, future))
                sessions.add(op.session_id)
                continue
            self._settle(group)
            group, sessions = [], set()
            if isinstance(op, Migrate):
                self._start_migration(op, future)
            elif isinstance(op, Click | Read):
                group, sessions = [(op, future)], {op.session_id}
            else:
                self._settle([(op, future)])
        self._settle(group)

    def _settle(self, ops: list[tuple[Any, Future[Any]]]) -> None:
        if not ops:
            return
        try:
            if isinstance(ops[0][0], Click | Read):
                results = self._score([op for op, _ in ops])
            else:
                results = [self._single(ops[0][0])]
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for _, future in ops:
                future.set_exception(exc)
            return
        for (_, future), result in zip(ops, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _start_migration(self, op: Migrate, future: Future[Any]) -> None:
        if self._migration is not None:
            future.set_exception(RecsysError("a model roll-over is already in progress"))
        else:
            self._migration = Migration(op.recommender, op.label, future, self.store)

    def _single(self, op: Any) -> Any:
        if isinstance(op, End):
            return self.store.drop(op.session_id)
        if isinstance(op, Stateless):
            return self.rec.recommend_batch(op.sessions, op.k, op.exclude_seen)
        raise RecsysError(f"unknown operation {type(op).__name__}")

    def _score(self, ops: Sequence[Click | Read]) -> list[Recommendation | Exception]:
        """One GRU step for the clicked sessions, then one catalogue pass for all of them."""
        rec, store = self.rec, self.store
        now = store.clock()
        kept: list[Any] = []
        unknown: list[list[Any]] = []
        stepping: list[int] = []
        items: list[int] = []
        for i, op in enumerate(ops):
            if isinstance(op, Read):
                kept.append(store.get(op.session_id, now))
                unknown.append([])
                continue
            session = store.get_or_start(op.session_id, now)
            known, missing = rec.to_indices([op.item])
            store.keep(session, plain_id(op.item), known[0] if known else None)
            if self._migration is not None:  # clicked after its replay: replayed again
                self._migration.clicked.add(op.session_id)
            if known:
                stepping.append(i)
                items.append(known[0])
            kept.append(session)
            unknown.append(missing)
        if stepping:
            states = step_states(rec.model, [kept[i].state for i in stepping], items)
            for row, i in enumerate(stepping):
                kept[i].state = states[row].clone()  # its own storage, not a view of the batch
        scored = [i for i, s in enumerate(kept) if s is not None and s.state is not None]
        ranked: dict[int, tuple[list[Any], list[float]]] = {}
        if scored:
            outputs = torch.stack([output_of(rec.model, kept[i].state) for i in scored])
            k_max = max(ops[i].k for i in scored)
            prefixes = [kept[i].seen for i in scored]
            flags = [ops[i].exclude_seen for i in scored]
            ranked = dict(zip(scored, rec.ranked(outputs, k_max, prefixes, flags), strict=True))
        results: list[Recommendation | Exception] = []
        for i, op in enumerate(ops):
            if kept[i] is None:
                results.append(NoSession(f"no live session {op.session_id!r}"))
            elif i in ranked:
                ids, values = ranked[i]
                results.append(Recommendation(ids[: op.k], values[: op.k], unknown[i]))
            else:
                results.append(rec.popular(op.k, unknown[i]))
        return results
