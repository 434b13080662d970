"""Scoring next-item recommendations from a trained GRU4Rec (DESIGN §6).

- ``SessionRecommender``: load by path or ``models:/name@alias``; ``recommend`` one session,
  ``recommend_batch`` many; original item ids in and out; unknown ids skipped and reported;
  an empty or all-unknown session gets the most popular items and says so.
- ``LiveSessions``: keeps each live session's hidden state (bounded, LRU + TTL), so a new click
  costs one GRU step and one top-k instead of re-reading the session.
- ``GRU4RecPyfunc``: the MLflow pyfunc wrapper that ``mlflow models serve`` runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.errors import RecsysError
from recsys.model.gru4rec import GRU4Rec
from recsys.model.recommender import pad_sessions

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class Recommendation:
    items: list[Any]  # original item ids, best first
    scores: list[float]
    unknown: list[Any] = field(default_factory=list)  # ids of the input that were skipped
    fallback: str | None = None  # "popular" when the session had no known item

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "scores": self.scores,
            "unknown": self.unknown,
            "fallback": self.fallback,
        }


def _normalise_id(value: Any, numeric: bool) -> Any:
    """Ids arrive as JSON numbers, strings or numpy scalars; map them to the index's type."""
    if isinstance(value, np.generic):
        value = value.item()
    if numeric:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        return value
    return str(value)


class SessionRecommender:
    """A trained GRU4Rec with its item index: original ids in, ranked original ids out."""

    def __init__(self, model: GRU4Rec, item_ids: Sequence[Any], support: Sequence[float]) -> None:
        self.model = model.eval()
        self.item_ids = list(item_ids)
        self.numeric_ids = all(isinstance(i, int) for i in self.item_ids[:1000])
        self.index = {item: idx for idx, item in enumerate(self.item_ids)}
        self.support = torch.as_tensor(np.asarray(support, dtype=np.float32))
        self.n_items = len(self.item_ids)

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, uri: str | Path) -> SessionRecommender:
        """From a model file, a directory holding ``model.pt``, or an MLflow ``models:/`` URI."""
        text = str(uri)
        if text.startswith(("models:/", "runs:/")):
            path = _download_model(text)
        else:
            path = Path(text)
            if path.is_dir():
                candidates = [path / MODEL_FILE, *sorted(path.glob(f"artifacts/**/{MODEL_FILE}"))]
                found = [p for p in candidates if p.is_file()]
                if not found:
                    raise RecsysError(f"{path}: no {MODEL_FILE} in this directory")
                path = found[0]
        model, payload = GRU4Rec.load(path)
        if "item_ids" not in payload:
            raise RecsysError(f"{path}: the model file has no item index")
        return cls(model, payload["item_ids"], payload.get("support", [1.0] * model.n_items))

    # --- the id mapping ---------------------------------------------------------------------

    def to_indices(self, items: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """Known items as indices (in order) and the unknown ids, which are skipped."""
        known: list[int] = []
        unknown: list[Any] = []
        for raw in items:
            idx = self.index.get(_normalise_id(raw, self.numeric_ids))
            if idx is None:
                unknown.append(raw.item() if isinstance(raw, np.generic) else raw)
            else:
                known.append(idx)
        return known, unknown

    def _popular(self, k: int) -> Recommendation:
        scores, idx = torch.topk(self.support, min(k, self.n_items))
        return Recommendation(
            [self.item_ids[i] for i in idx.tolist()], scores.tolist(), fallback="popular"
        )

    def _top(
        self, scores: torch.Tensor, k: int, seen: Sequence[int] | None
    ) -> tuple[list[Any], list[float]]:
        if seen:
            scores = scores.clone()
            scores[torch.as_tensor(list(seen), dtype=torch.int64)] = float("-inf")
        k = min(k, self.n_items)
        values, idx = torch.topk(scores, k)
        return [self.item_ids[i] for i in idx.tolist()], values.tolist()

    # --- scoring ----------------------------------------------------------------------------

    def recommend(
        self, items: Sequence[Any], k: int = 20, exclude_seen: bool = False
    ) -> Recommendation:
        """Top-k next items for one session given as original item ids."""
        return self.recommend_batch([items], k, exclude_seen)[0]

    def recommend_batch(
        self, sessions: Sequence[Sequence[Any]], k: int = 20, exclude_seen: bool = False
    ) -> list[Recommendation]:
        """Top-k for many sessions in one batched GRU pass and one GEMM."""
        if k < 1:
            raise RecsysError(f"k must be at least 1, got {k}")
        mapped = [self.to_indices(s) for s in sessions]
        known_rows = [i for i, (known, _) in enumerate(mapped) if known]
        out: list[Recommendation | None] = [None] * len(sessions)
        if known_rows:
            with torch.inference_mode():
                prefixes = [np.asarray(mapped[i][0], dtype=np.int64) for i in known_rows]
                padded, lengths = pad_sessions(prefixes)
                outs = self.model.encode_sessions(padded, lengths)  # (B, T, H)
                last = outs[torch.arange(len(prefixes)), lengths - 1]  # (B, H)
                scores = self.model.score_all(last)  # (B, n_items)
            for row, i in enumerate(known_rows):
                known, unknown = mapped[i]
                ids, vals = self._top(scores[row], k, known if exclude_seen else None)
                out[i] = Recommendation(ids, vals, unknown)
        for i, (known, unknown) in enumerate(mapped):
            if not known:
                pop = self._popular(k)
                out[i] = Recommendation(pop.items, pop.scores, unknown, fallback="popular")
        return [r for r in out if r is not None]

    def live(self, capacity: int = 100_000, ttl_seconds: float = 1800.0) -> LiveSessions:
        return LiveSessions(self, capacity, ttl_seconds)


@dataclass
class _LiveState:
    hidden: list[torch.Tensor]
    output: torch.Tensor | None
    seen: list[int]
    touched: float


class LiveSessions:
    """Hidden state per live session: one GRU step per click, bounded by LRU and TTL eviction."""

    def __init__(self, recommender: SessionRecommender, capacity: int, ttl_seconds: float) -> None:
        if capacity < 1:
            raise RecsysError("the live-session store needs a capacity of at least 1")
        self.rec = recommender
        self.capacity = capacity
        self.ttl = ttl_seconds
        self._states: OrderedDict[Hashable, _LiveState] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, session_id: Hashable) -> bool:
        return session_id in self._states

    def _evict(self, now: float) -> None:
        while self._states:
            oldest_id, oldest = next(iter(self._states.items()))
            if len(self._states) > self.capacity or now - oldest.touched > self.ttl:
                del self._states[oldest_id]
                self.evicted += 1
            else:
                break

    def click(
        self, session_id: Hashable, item: Any, k: int = 20, exclude_seen: bool = False
    ) -> Recommendation:
        """Record a click and return the next-item recommendations for that session."""
        now = time.monotonic()
        state = self._states.pop(session_id, None)
        if state is not None and now - state.touched > self.ttl:
            state = None
            self.evicted += 1
        if state is None:
            state = _LiveState(self.rec.model.init_hidden(1), None, [], now)
        known, unknown = self.rec.to_indices([item])
        if known:
            with torch.inference_mode():
                x = self.rec.model.input_table()[torch.tensor(known)]  # (1, D_in)
                state.output, state.hidden = self.rec.model.step(x, state.hidden, train=False)
            state.seen.append(known[0])
        state.touched = now
        self._states[session_id] = state
        self._evict(now)
        if state.output is None:
            pop = self.rec._popular(k)
            return Recommendation(pop.items, pop.scores, unknown, fallback="popular")
        with torch.inference_mode():
            scores = self.rec.model.score_all(state.output)[0]
        ids, vals = self.rec._top(scores, k, state.seen if exclude_seen else None)
        return Recommendation(ids, vals, unknown)

    def end(self, session_id: Hashable) -> None:
        self._states.pop(session_id, None)


def _download_model(uri: str) -> Path:
    """Fetch a registered model's weights from MLflow (the pyfunc's ``model`` artifact)."""
    from recsys.mlflow_store import connect

    connect()
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - unknown name/alias, unreachable store
        raise RecsysError(
            f"could not load {uri} from MLflow: {str(exc).splitlines()[0][:300]}"
        ) from None
    found = sorted(local.glob(f"**/{MODEL_FILE}"))
    if not found:
        raise RecsysError(f"{uri}: the MLflow model has no {MODEL_FILE} artifact")
    return found[0]
