"""Scoring next-item recommendations from a trained GRU4Rec (DESIGN §6).

- ``SessionRecommender``: load by path or ``models:/name@alias``; ``recommend`` one session,
  ``recommend_batch`` many; original item ids in and out; unknown ids skipped and reported;
  an empty or all-unknown session gets the most popular items and says so.
- ``LiveSessions``: keeps each live session's hidden state (bounded, LRU + TTL), so a new click
  costs one GRU step and one top-k instead of re-reading the session.
- The MLflow pyfunc wrapper that ``mlflow models serve`` runs lives in ``recsys.serving.pyfunc``.

Scores and rankings are exactly what the evaluation harness computes for the same prefix (same
network code, the same ``recsys.ranking`` ranker), so an offline metric describes what is served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.core.errors import RecsysError
from recsys.model.artifact import TrainedModel, plain_id
from recsys.model.gru4rec import GRU4Rec
from recsys.model.kernels import ranking_kernels
from recsys.ranking import CatalogueRanker, fast_by_default, ranker_for
from recsys.serving.live_store import SessionStore

POPULAR = "popular"

# Stands in for an id that can never be in a catalogue (a JSON ``true``, say): a bool would
# otherwise hash equal to the integer item 1 or 0.
_NO_ITEM = object()


@dataclass(frozen=True)
class Recommendation:
    """One session's answer: the ranked items and what was skipped or substituted to get it."""

    items: list[Any]  # original item ids, best first
    scores: list[float]
    unknown: list[Any] = field(default_factory=list)  # ids of the input that were skipped
    fallback: str | None = None  # "popular" when the session had no known item

    def as_dict(self) -> dict[str, Any]:
        """The REST response record (JSON-serialisable as is)."""
        return {
            "items": self.items,
            "scores": self.scores,
            "unknown": self.unknown,
            "fallback": self.fallback,
        }


def _normalise_id(value: Any, numeric: bool) -> Any:
    """Ids arrive as JSON numbers, strings or numpy scalars; map them to the index's type."""
    value = plain_id(value)
    if isinstance(value, bool):
        return _NO_ITEM
    if numeric:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if text.lstrip("-").isdigit():
                return int(text)
        return _NO_ITEM
    return str(value)


def positive_k(k: Any, name: str = "k") -> int:
    """A top-k size from any caller (Python, numpy, a JSON body): a positive integer or an error."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise RecsysError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads for this process (``None`` or 0 leaves the default).

    One thread is the serving default: a top-k is one small GEMV, and on a busy machine the
    OpenMP barrier of a second thread that is descheduled costs milliseconds (measured:
    a 512-unit GRU step took 8 ms with 2 threads vs 0.15 ms with 1 on a shared 2-core VM).
    """
    if threads:
        torch.set_num_threads(int(threads))


class SessionRecommender:
    """A trained GRU4Rec with its item index: original ids in, ranked original ids out."""

    def __init__(self, trained: TrainedModel, fast_top_k: bool | None = None) -> None:
        self.trained = replace(trained, optimizer=None)  # a warm start's state: not served
        self.model: GRU4Rec = trained.network.eval()
        self.item_ids = list(trained.items.ids)
        self.numeric_ids = trained.items.numeric
        self.index = {item: idx for idx, item in enumerate(self.item_ids)}
        self.support = torch.as_tensor(np.asarray(trained.items.support, dtype=np.float32))
        self.n_items = len(self.item_ids)
        # Popularity is the same for every fallback: rank the catalogue once.
        self._pop_scores, self._pop_order = torch.sort(self.support, descending=True, stable=True)
        # Exact top-k with a certified low-precision first pass (recsys.ranking); None = by size.
        self.fast_top_k = fast_by_default(self.n_items) if fast_top_k is None else fast_top_k
        self.fast_stats = {"certified": 0, "fallback": 0}
        if self.fast_top_k and self.n_items:
            self.ranker.prepare(gemv=True)  # one session's pass: built now, not on a request

    def prepare_batches(self) -> None:
        """Build the batch pass's low-precision copy now. The live service scores micro-batches:
        built lazily, the copy (a bf16 catalogue, ~45 MB for 43k items) stalled the first batch
        of more than ``GEMV_ROWS`` rows, on a request, after every start and every swap."""
        if self.fast_top_k and self.n_items:
            self.ranker.prepare(gemv=False)

    @property
    def ranker(self) -> CatalogueRanker:
        """The network's ranker, looked up per call: it is rebuilt when the weights change."""
        return ranker_for(self.model.item_out, self.model.item_bias, self.model, ranking_kernels)

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, uri: str | Path, threads: int | None = None, fast_top_k: bool | None = None
    ) -> SessionRecommender:
        """From a model file, a directory holding ``model.pt``, or an MLflow ``models:/`` URI.

        ``threads`` sets torch's thread count for the process (see ``set_threads``);
        ``fast_top_k`` forces the certified low-precision first pass on or off (default: by size).
        """
        set_threads(threads)
        from recsys.serving.mlflow_store import load_model

        return cls(load_model(uri), fast_top_k)

    # --- the id mapping ---------------------------------------------------------------------

    def to_indices(self, items: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Known items as indices (in order) and the unknown ids, which are skipped."""
        known: list[int] = []
        unknown: list[Any] = []
        for raw in items:
            idx = self.index.get(_normalise_id(raw, self.numeric_ids))
            if idx is None:
                unknown.append(plain_id(raw))
            else:
                known.append(idx)
        return known, unknown

    def popular(self, k: int, unknown: Sequence[Any] = ()) -> Recommendation:
        """The k most clicked items of the training data (the fallback for an empty session)."""
        k = min(k, self.n_items)
        return Recommendation(
            [self.item_ids[i] for i in self._pop_order[:k].tolist()],
            self._pop_scores[:k].tolist(),
            list(unknown),
            fallback=POPULAR,
        )

    def ranked(
        self,
        outputs: torch.Tensor,
        k: int,
        prefixes: Sequence[Sequence[int]],
        exclude_seen: bool | Sequence[bool] = False,
    ) -> list[tuple[list[Any], list[float]]]:
        """Exact top-k of GRU outputs (B, H) after ``prefixes`` (item indices) as original ids;
        ``exclude_seen`` (for all rows, or one flag per row) leaves a prefix's own items out."""
        boost = self.model.prefix_boosts(outputs, prefixes)  # None, at no cost, without a readout
        flags = [exclude_seen] * len(prefixes) if isinstance(exclude_seen, bool) else exclude_seen
        seen = [list(p) if f else [] for p, f in zip(prefixes, flags, strict=True)]
        seen = seen if any(flags) else None
        result = self.ranker.top_k(outputs, k, exclude=seen, fast=self.fast_top_k, boost=boost)
        if self.fast_top_k:
            self.fast_stats["certified"] += result.certified
            self.fast_stats["fallback"] += len(outputs) - result.certified
        ranked = []
        for items, values in zip(result.items.tolist(), result.scores.tolist(), strict=True):
            # a catalogue smaller than k + seen runs out: excluded items come back as -inf
            kept = [(i, v) for i, v in zip(items, values, strict=True) if v > float("-inf")]
            ranked.append(([self.item_ids[i] for i, _ in kept], [v for _, v in kept]))
        return ranked

    # --- scoring ----------------------------------------------------------------------------

    def recommend(
        self, items: Sequence[Any], k: int = 20, exclude_seen: bool = False
    ) -> Recommendation:
        """Top-k next items for one session given as original item ids (oldest click first)."""
        return self.recommend_batch([items], k, exclude_seen)[0]

    def recommend_batch(
        self, sessions: Sequence[Sequence[Any]], k: int = 20, exclude_seen: bool = False
    ) -> list[Recommendation]:
        """Top-k for many sessions in one batched GRU pass and one catalogue pass."""
        k = positive_k(k)
        mapped = [self.to_indices(s) for s in sessions]
        known_rows = [i for i, (known, _) in enumerate(mapped) if known]
        ranked: dict[int, tuple[list[Any], list[float]]] = {}
        if known_rows:
            with torch.inference_mode():
                prefixes = [np.asarray(mapped[i][0], dtype=np.int64) for i in known_rows]
                last = self.model.last_outputs(prefixes)  # (B, H)
            known = [mapped[i][0] for i in known_rows]
            ranked = dict(zip(known_rows, self.ranked(last, k, known, exclude_seen), strict=True))
        out: list[Recommendation] = []
        for i, (_, unknown) in enumerate(mapped):
            if i in ranked:
                ids, vals = ranked[i]
                out.append(Recommendation(ids, vals, unknown))
            else:
                out.append(self.popular(k, unknown))
        return out

    def live(
        self,
        capacity: int = 100_000,
        ttl_seconds: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> LiveSessions:
        """A store of live sessions on this model (see ``LiveSessions``)."""
        return LiveSessions(self, capacity, ttl_seconds, clock)


@dataclass
class _LiveState:
    hidden: list[torch.Tensor]
    output: torch.Tensor | None  # (1, H_last) after the last known click; None before any
    seen: list[int]
    touched: float


class LiveSessions:
    """Hidden state per live session: one GRU step per click, bounded by LRU and TTL eviction.

    A click returns the same ranking as re-running the whole session through ``recommend``
    (scores equal to float rounding: a click projects its input alone, a re-run the whole
    session in one product), without re-reading it. At most ``capacity`` sessions are kept (the least recently clicked
    go first) and a session idle for more than ``ttl_seconds`` is forgotten; its next click
    starts it afresh. ``clock`` is injectable so that expiry can be tested without sleeping.
    Safe to call from several threads: the state changes under a lock, scoring outside it.
    """

    def __init__(
        self,
        recommender: SessionRecommender,
        capacity: int = 100_000,
        ttl_seconds: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # the one LRU + TTL rule, shared with the live service (recsys.serving.live_store)
        self._store: SessionStore[_LiveState] = SessionStore(capacity, ttl_seconds, clock=clock)
        self.rec = recommender
        self.capacity = capacity
        self.ttl = ttl_seconds
        self.clock = clock
        self._lock = threading.Lock()

    @property
    def evicted(self) -> int:
        """Sessions dropped for capacity or idleness, since creation."""
        return self._store.evicted

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, session_id: Hashable) -> bool:
        return self._store.peek(session_id, self.clock()) is not None

    def expire(self) -> int:
        """Forget the sessions idle past the TTL now (clicks do this too); returns how many."""
        with self._lock:
            return self._store.expire()

    def click(
        self, session_id: Hashable, item: Any, k: int = 20, exclude_seen: bool = False
    ) -> Recommendation:
        """Record a click and return the next-item recommendations for that session."""
        k = positive_k(k)
        model = self.rec.model
        known, unknown = self.rec.to_indices([item])
        with self._lock:
            now = self.clock()
            state = self._store.get(session_id, now)  # None when absent or expired
            if state is None:
                state = _LiveState(model.init_hidden(1), None, [], now)
            if known:
                with torch.inference_mode():
                    gates = model.input_gates(torch.tensor(known))  # (1, 3H)
                    state.output, state.hidden = model.infer_step(gates, state.hidden)
                state.seen.append(known[0])
            self._store.put(session_id, state, now)
            output = state.output
            seen = list(state.seen)
        if output is None:
            return self.rec.popular(k, unknown)
        ids, vals = self.rec.ranked(output, k, [seen], exclude_seen)[0]
        return Recommendation(ids, vals, unknown)

    def end(self, session_id: Hashable) -> None:
        """Forget a session now (the user left); unknown ids are ignored."""
        with self._lock:
            self._store.drop(session_id)
