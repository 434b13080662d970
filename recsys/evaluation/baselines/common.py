"""What every baseline shares: the train log as flat arrays, batch helpers, the tie-breaker.

Ties and items without evidence. The evaluator counts ties against the model, and kNN or rule
scores are zero for most of the catalogue. Every model therefore breaks ties by train popularity
(``pop_norm = clicks / (max_clicks + 1)``), in a way that never puts an item without evidence at
or above an item with evidence: items without evidence score ``eps_row * pop_norm`` with
``eps_row`` at most half the row's smallest evidence score (a popularity fallback), and evidence
scores get a popularity term below the algorithm's score resolution (see ``Baseline._densify``).
Arithmetic is float64; the final float32 cast is monotone, so it can merge near-equal scores but
never reorder them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM_IDX, SESSION, TIME
from recsys.evaluation.scorer import SessionScorer

# Relative popularity tie-breaker for real-valued scores: large enough to survive the float32
# cast for popularity differences of about 1e-3 * max_pop, small enough to be meaningless.
_REL_TIEBREAK = 1e-4
# Tie-breaker scale for a row without any evidence (pure popularity fallback).
_NO_EVIDENCE_SCALE = 1.0


@dataclass(frozen=True)
class SessionLog:
    """Train events as flat arrays, sessions ordered from oldest to most recent.

    Session index order = recency order (last click time, then order of appearance), so "the most
    recent sessions" of any subset are simply its largest session indices.
    """

    items: np.ndarray  # int64 item of every event, grouped by session, in click order
    ptr: np.ndarray  # int64 (n_sessions + 1) event offsets of each session
    last_time: np.ndarray  # int64 last click time (ms since epoch) of each session

    @property
    def n_sessions(self) -> int:
        return len(self.ptr) - 1

    def event_session(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_sessions, dtype=np.int64), np.diff(self.ptr))

    def event_position(self) -> np.ndarray:
        """1-based click position of every event inside its session."""
        return (
            np.arange(len(self.items), dtype=np.int64)
            - np.repeat(self.ptr[:-1], np.diff(self.ptr))
            + 1
        )


def read_log(train: pl.DataFrame, n_items: int, baseline: str) -> SessionLog:
    """Validate the train frame and build a recency-ordered `SessionLog` (input untouched)."""
    missing = [c for c in (SESSION, ITEM_IDX, TIME) if c not in train.columns]
    if missing:
        raise RecsysError(f"baseline {baseline!r}: train data lacks column(s) {missing}")
    if train.height == 0:
        raise RecsysError(f"baseline {baseline!r}: train data is empty")
    time = pl.col(TIME)
    time = time.dt.epoch("ms") if train.schema[TIME].is_temporal() else time.cast(pl.Int64)
    df = train.select(
        pl.col(SESSION), pl.col(ITEM_IDX).cast(pl.Int64), time.alias(TIME)
    ).with_row_index("_row")
    lo, hi = df[ITEM_IDX].min(), df[ITEM_IDX].max()
    if lo is None or lo < 0 or hi >= n_items or df[TIME].null_count() or df[SESSION].null_count():
        raise RecsysError(
            f"baseline {baseline!r}: train needs non-null session_id/timestamp and item_idx in "
            f"0..{n_items - 1}, got item_idx range {lo}..{hi}"
        )
    sessions = (
        df.group_by(SESSION, maintain_order=True)
        .agg(pl.col(TIME).max().alias("_last"))
        .with_row_index("_appear")
        .sort(["_last", "_appear"])
        .with_row_index("_sidx")
    )
    events = df.join(sessions.select(SESSION, "_sidx"), on=SESSION).sort(["_sidx", "_row"])
    counts = np.bincount(events["_sidx"].to_numpy(), minlength=sessions.height)
    ptr = np.zeros(sessions.height + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return SessionLog(
        items=events[ITEM_IDX].to_numpy().astype(np.int64),
        ptr=ptr,
        last_time=sessions["_last"].to_numpy().astype(np.int64),
    )


def last_occurrences(
    group: np.ndarray, items: np.ndarray, pos: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (group, item) pairs with the item's last position, sorted by group then item."""
    key = group * n_items + items
    order = np.lexsort((pos, key))
    k = key[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    sel = order[last]
    return group[sel], items[sel], pos[sel]


def row_groups(rows: np.ndarray) -> np.ndarray:
    """Rank of every entry inside its run of equal (sorted) row ids."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def top_per_row(rows: np.ndarray, value: np.ndarray, *tiebreaks: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest `value` per row, row-major; ties go to larger `tiebreaks`."""
    keys = [-t for t in reversed(tiebreaks)] + [-value, rows]
    order = np.lexsort(keys)
    return order[row_groups(rows[order]) < k]


def csr_rows(matrix: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))


def prefix_arrays(
    prefixes: Sequence[np.ndarray], n_items: int, baseline: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a batch of prefixes: (row, item, 1-based position) per click and each length."""
    arrays = [np.asarray(p, dtype=np.int64).ravel() for p in prefixes]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    if len(arrays) and lengths.min() == 0:
        raise RecsysError(f"baseline {baseline!r}: cannot score an empty session prefix")
    items = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise RecsysError(
            f"baseline {baseline!r}: prefix item indices must be in 0..{n_items - 1}, "
            f"got {items.min()}..{items.max()}"
        )
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(len(items), dtype=np.int64) - np.repeat(starts, lengths) + 1
    return rows, items, pos, lengths


class Baseline(SessionScorer):
    """Shared fit bookkeeping and the sparse evidence -> tie-broken dense scores conversion."""

    name = "baseline"

    def __init__(self, n_items: int) -> None:
        if isinstance(n_items, bool) or not isinstance(n_items, int | np.integer) or n_items < 1:
            raise RecsysError(
                f"baseline {self.name!r}: n_items must be a positive integer, got {n_items!r}"
            )
        super().__init__(int(n_items))
        self._pop_norm: np.ndarray | None = None  # float64 pop / (max_pop + 1), in [0, 1)

    def _fit_popularity(self, log: SessionLog) -> None:
        pop = np.bincount(log.items, minlength=self.n_items).astype(np.float64)
        self._pop_norm = pop / (pop.max() + 1.0)

    def _pop(self) -> np.ndarray:
        if self._pop_norm is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        return self._pop_norm

    def _densify(self, evidence: sp.csr_matrix, resolution: float | None) -> torch.Tensor:
        """Dense float32 scores from non-negative sparse evidence plus the popularity tie-breaker.

        ``resolution`` is the smallest possible difference between two distinct scores of the
        algorithm: evidence gets ``+ eps_row * pop_norm`` with ``eps_row <= resolution / 4``, which
        never reorders distinct scores. None means real-valued scores without such a grid: each row
        is divided by its maximum (ranking-neutral, as session-rec's V-SKNN does; it keeps products
        of decays away from float32 underflow) and multiplied by ``1 + _REL_TIEBREAK * pop_norm``,
        which reorders two scores only when they are within a relative ``_REL_TIEBREAK``. Items
        without evidence get ``eps_row * pop_norm`` with ``eps_row <= rowmin / 2``: strictly below
        every evidence score of their row.
        """
        pop = self._pop()
        evidence = evidence.tocsr()
        evidence.sum_duplicates()
        evidence.eliminate_zeros()
        rows = csr_rows(evidence)
        cols = evidence.indices
        values = evidence.data.astype(np.float64)
        eps = np.full(evidence.shape[0], _NO_EVIDENCE_SCALE)
        has = np.diff(evidence.indptr) > 0
        if has.any():
            starts = evidence.indptr[:-1][has]
            if resolution is None:
                row_max = np.maximum.reduceat(values, starts)
                scale = np.ones(evidence.shape[0])
                scale[has] = row_max
                values = values / scale[rows]
                eps[has] = 0.5 * np.minimum.reduceat(values, starts)
                values = values * (1.0 + _REL_TIEBREAK * pop[cols])
            else:
                eps[has] = np.minimum(0.25 * resolution, 0.5 * np.minimum.reduceat(values, starts))
                values = values + eps[rows] * pop[cols]
        out = np.multiply.outer(eps.astype(np.float32), pop.astype(np.float32))
        out[rows, cols] = values.astype(np.float32)
        return torch.from_numpy(out)
