"""Strong non-neural session-based baselines: POP, S-POP, item-kNN, V-SKNN, STAN and SR.

Published comparisons (Ludewig & Jannach 2018; Ludewig et al. 2021) show that these simple
methods often match or beat recurrent models, so GRU4Rec is only credible next to them. Each one
follows its paper and the defaults used by the session-rec framework, re-implemented with sparse
matrices so that a full Diginetica evaluation takes seconds, not hours. Where session-rec's
behaviour and a paper's wording differ, the class docstring says which one is implemented.

Ties and items without evidence. The evaluator counts ties against the model, and kNN or rule
scores are zero for most of the catalogue. Every model therefore breaks ties by train popularity
(``pop_norm = clicks / (max_clicks + 1)``), in a way that never puts an item without evidence at
or above an item with evidence: items without evidence score ``eps_row * pop_norm`` with
``eps_row`` at most half the row's smallest evidence score (a popularity fallback), and evidence
scores get a popularity term below the algorithm's score resolution (see ``_Baseline._densify``).
Arithmetic is float64; the final float32 cast is monotone, so it can merge near-equal scores but
never reorder them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM_IDX, SESSION, TIME
from recsys.evaluation.scorer import Recommender

_MS_PER_DAY = 86_400_000
# Relative popularity tie-breaker for real-valued scores: large enough to survive the float32
# cast for popularity differences of about 1e-3 * max_pop, small enough to be meaningless.
_REL_TIEBREAK = 1e-4
# Tie-breaker scale for a row without any evidence (pure popularity fallback).
_NO_EVIDENCE_SCALE = 1.0


# --------------------------------------------------------------------------- validation


def _positive_int(baseline: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise RecsysError(
            f"baseline {baseline!r}: {name} must be a positive integer, got {value!r}"
        )
    return int(value)


def _positive_float(baseline: str, name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(value)
        or value <= 0
    ):
        extra = " or null" if allow_none else ""
        raise RecsysError(
            f"baseline {baseline!r}: {name} must be a positive number{extra}, got {value!r}"
        )
    return float(value)


def _nonnegative_float(baseline: str, name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(value)
        or value < 0
    ):
        raise RecsysError(f"baseline {baseline!r}: {name} must be a number >= 0, got {value!r}")
    return float(value)


def _choice(baseline: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RecsysError(
            f"baseline {baseline!r}: {name} must be one of {list(allowed)}, got {value!r}"
        )
    return str(value)


# --------------------------------------------------------------------------- shared data plumbing


@dataclass(frozen=True)
class _SessionLog:
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


def _read_log(train: pl.DataFrame, n_items: int, baseline: str) -> _SessionLog:
    """Validate the train frame and build a recency-ordered `_SessionLog` (input untouched)."""
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
    return _SessionLog(
        items=events[ITEM_IDX].to_numpy().astype(np.int64),
        ptr=ptr,
        last_time=sessions["_last"].to_numpy().astype(np.int64),
    )


def _last_occurrences(
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


def _row_groups(rows: np.ndarray) -> np.ndarray:
    """Rank of every entry inside its run of equal (sorted) row ids."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def _top_per_row(rows: np.ndarray, value: np.ndarray, *tiebreaks: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest `value` per row, row-major; ties go to larger `tiebreaks`."""
    keys = [-t for t in reversed(tiebreaks)] + [-value, rows]
    order = np.lexsort(keys)
    return order[_row_groups(rows[order]) < k]


def _csr_rows(matrix: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))


def _prefix_arrays(
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


# --------------------------------------------------------------------------- base class


class _Baseline(Recommender):
    """Shared fit bookkeeping and the sparse evidence -> tie-broken dense scores conversion."""

    name = "baseline"

    def __init__(self, n_items: int) -> None:
        n_items = _positive_int(self.name, "n_items", n_items)
        super().__init__(n_items)
        self._pop_norm: np.ndarray | None = None  # float64 pop / (max_pop + 1), in [0, 1)

    def _fit_popularity(self, log: _SessionLog) -> None:
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
        rows = _csr_rows(evidence)
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


# --------------------------------------------------------------------------- POP and S-POP


class Pop(_Baseline):
    """POP: the most clicked train items, identical for every session.

    The weakest sensible recommender; any model that does not beat it learned nothing about
    sequences. Score = train click count (items never clicked score 0, all tied).
    """

    name = "pop"

    def __init__(self, n_items: int) -> None:
        super().__init__(n_items)
        self._counts: np.ndarray | None = None

    def fit(self, train: pl.DataFrame) -> Pop:
        log = _read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        counts = np.bincount(log.items, minlength=self.n_items).astype(np.float32)
        self._counts = counts
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._counts is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        _prefix_arrays(prefixes, self.n_items, self.name)  # same input validation as the others
        return torch.from_numpy(np.tile(self._counts, (len(prefixes), 1)))


class SPop(_Baseline):
    """S-POP: items already clicked in the session first (by click count), then global popularity.

    Captures repeat views, which are frequent in e-commerce logs. Score = number of times the item
    occurs in the prefix + pop / (max_pop + 1), so the popularity term (< 1) only orders items with
    equal in-session counts.
    """

    name = "spop"

    def fit(self, train: pl.DataFrame) -> SPop:
        self._fit_popularity(_read_log(train, self.n_items, self.name))
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        pop = self._pop()
        rows, items, _, _ = _prefix_arrays(prefixes, self.n_items, self.name)
        out = np.tile(pop.astype(np.float32), (len(prefixes), 1))
        key, counts = np.unique(rows * self.n_items + items, return_counts=True)
        r, i = np.divmod(key, self.n_items)
        out[r, i] = (counts + pop[i]).astype(np.float32)
        return torch.from_numpy(out)


# --------------------------------------------------------------------------- item-kNN


class ItemKNN(_Baseline):
    """Item-kNN (GRU4Rec paper / session-rec ItemKNN): neighbours of the last clicked item.

    sim(a, b) = co(a, b) / ((supp_a + lmbd)^alpha * (supp_b + lmbd)^(1 - alpha)), where co is the
    number of train sessions containing both items and supp the number containing each one (binary
    session-item incidence; session-rec counts a's clicks instead, which differs only for repeated
    clicks). ``lmbd`` damps rare items' incidental co-occurrences; ``alpha=0.5`` is cosine. Only
    the ``n_sims`` most similar items of each item keep a score (ties at the cut: more popular,
    then lower index). The item itself scores 0. Scores depend only on the last prefix item.
    """

    name = "iknn"

    def __init__(
        self, n_items: int, n_sims: int = 100, lmbd: float = 20.0, alpha: float = 0.5
    ) -> None:
        super().__init__(n_items)
        self.n_sims = _positive_int(self.name, "n_sims", n_sims)
        self.lmbd = _nonnegative_float(self.name, "lmbd", lmbd)
        self.alpha = _nonnegative_float(self.name, "alpha", alpha)
        if self.alpha > 1:
            raise RecsysError(f"baseline {self.name!r}: alpha must be in [0, 1], got {alpha!r}")
        self._sims: sp.csr_matrix | None = None

    def fit(self, train: pl.DataFrame) -> ItemKNN:
        log = _read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        sess, items, _ = _last_occurrences(
            log.event_session(), log.items, log.event_position(), self.n_items
        )
        incidence = sp.csr_matrix(
            (np.ones(len(items)), (sess, items)), shape=(log.n_sessions, self.n_items)
        )
        co = (incidence.T @ incidence).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        supp = np.bincount(items, minlength=self.n_items).astype(np.float64) + self.lmbd
        rows = _csr_rows(co)
        norm = np.power(supp[rows], self.alpha) * np.power(supp[co.indices], 1.0 - self.alpha)
        sims = co.data / np.where(norm > 0, norm, 1.0)
        keep = _top_per_row(rows, sims, self._pop()[co.indices], -co.indices, k=self.n_sims)
        self._sims = sp.csr_matrix(
            (sims[keep], (rows[keep], co.indices[keep])), shape=(self.n_items, self.n_items)
        )
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._sims is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        _, items, _, lengths = _prefix_arrays(prefixes, self.n_items, self.name)
        last = items[np.cumsum(lengths) - 1]
        return self._densify(self._sims[last], resolution=None)


# --------------------------------------------------------------------------- sequential rules


class SequentialRules(_Baseline):
    """SR (Ludewig & Jannach 2018): weighted "a is followed by b" rules, scored by the last item.

    Every pair of clicks (a at position p, b at position p + d) of a train session with
    1 <= d <= ``steps`` adds weight(d) to rule a -> b, where 'div' = 1/d, 'same' = 1 and
    'quadratic' = 1/d^2 (repeats a -> a count too). Each item keeps its ``pruning`` heaviest rules
    (ties: more popular target, then lower index; 0 keeps all). The score of b after a prefix is
    the weight of rule last -> b. Rule weights are multiples of 1/lcm(weight denominators), so the
    tie-breaker is kept below a quarter of that resolution.
    """

    name = "sr"

    def __init__(
        self, n_items: int, steps: int = 10, weighting: str = "div", pruning: int = 20
    ) -> None:
        super().__init__(n_items)
        self.steps = _positive_int(self.name, "steps", steps)
        self.weighting = _choice(self.name, "weighting", weighting, ("div", "same", "quadratic"))
        if isinstance(pruning, bool) or not isinstance(pruning, int | np.integer) or pruning < 0:
            raise RecsysError(
                f"baseline {self.name!r}: pruning must be an integer >= 0, got {pruning!r}"
            )
        self.pruning = int(pruning)
        self._rules: sp.csr_matrix | None = None

    def _weight(self, d: int) -> float:
        return {"div": 1.0 / d, "same": 1.0, "quadratic": 1.0 / (d * d)}[self.weighting]

    def _resolution(self) -> float:
        if self.weighting == "same":
            return 1.0
        denominators = range(1, self.steps + 1)
        if self.weighting == "quadratic":
            denominators = [d * d for d in denominators]
        return 1.0 / math.lcm(*denominators)

    def fit(self, train: pl.DataFrame) -> SequentialRules:
        log = _read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        session = log.event_session()
        src, dst, weight = [], [], []
        for d in range(1, self.steps + 1):
            same = (
                np.flatnonzero(session[:-d] == session[d:])
                if len(session) > d
                else np.zeros(0, int)
            )
            if len(same) == 0:
                break  # no session is longer than d
            src.append(log.items[same])
            dst.append(log.items[same + d])
            weight.append(np.full(len(same), self._weight(d)))
        if src:
            rules = sp.coo_matrix(
                (np.concatenate(weight), (np.concatenate(src), np.concatenate(dst))),
                shape=(self.n_items, self.n_items),
            ).tocsr()
            rules.sum_duplicates()
        else:
            rules = sp.csr_matrix((self.n_items, self.n_items))
        if self.pruning:
            rows = _csr_rows(rules)
            targets = rules.indices
            keep = _top_per_row(rows, rules.data, self._pop()[targets], -targets, k=self.pruning)
            rules = sp.csr_matrix(
                (rules.data[keep], (rows[keep], rules.indices[keep])), shape=rules.shape
            )
        self._rules = rules
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._rules is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        _, items, _, lengths = _prefix_arrays(prefixes, self.n_items, self.name)
        last = items[np.cumsum(lengths) - 1]
        return self._densify(self._rules[last], resolution=self._resolution())


# --------------------------------------------------------------------------- session kNN family


@dataclass(frozen=True)
class _PrefixInfo:
    """Per-row facts of a prefix batch used by the similarity and scoring hooks."""

    length: np.ndarray  # clicks per prefix (repeats included)
    n_distinct: np.ndarray  # distinct items per prefix
    sq_norm: np.ndarray  # squared norm of the weighted prefix vector
    key: np.ndarray  # sorted row * n_items + item of the distinct prefix items
    last_pos: np.ndarray  # last 1-based position of each of those items in its prefix


@dataclass(frozen=True)
class _Neighbours:
    """Selected (prefix row, neighbour session, similarity) triples of one batch, row-major."""

    row: np.ndarray
    session: np.ndarray
    sim: np.ndarray


@dataclass(frozen=True)
class _Expanded:
    """Every distinct item of every selected neighbour session, grouped by neighbour."""

    pair: np.ndarray  # index into _Neighbours of each entry
    starts: np.ndarray  # first entry of each neighbour (all neighbours are non-empty)
    item: np.ndarray
    nb_pos: np.ndarray  # last 1-based position of the item in the neighbour session
    prefix_pos: np.ndarray  # last 1-based position of the item in the prefix, 0 if absent


class _SessionKNN(_Baseline):
    """Shared machinery of V-SKNN and STAN: recent-sample neighbour search by sparse products.

    Candidates of a prefix are the train sessions that contain any prefix item; the
    ``sample_size`` most recent of them (by last click time) are kept, their similarity to the
    prefix is computed, and the ``k`` most similar (ties: more recent) become neighbours. Subclasses
    define the prefix item weights, the similarity and each neighbour item's contribution.
    """

    def __init__(self, n_items: int, k: int, sample_size: int) -> None:
        super().__init__(n_items)
        self.k = _positive_int(self.name, "k", k)
        self.sample_size = _positive_int(self.name, "sample_size", sample_size)
        self._log: _SessionLog | None = None

    def fit(self, train: pl.DataFrame) -> _SessionKNN:
        log = _read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        sess, items, pos = _last_occurrences(
            log.event_session(), log.items, log.event_position(), self.n_items
        )
        self._log = log
        self._sd_items, self._sd_pos = items, pos  # distinct items per session, sorted by session
        self._sd_len = np.bincount(sess, minlength=log.n_sessions)
        self._sd_ptr = np.zeros(log.n_sessions + 1, dtype=np.int64)
        np.cumsum(self._sd_len, out=self._sd_ptr[1:])
        # items x sessions incidence: row i lists the sessions containing item i, in recency order
        self._item_sessions = sp.csr_matrix(
            (np.ones(len(items)), (items, sess)), shape=(self.n_items, log.n_sessions)
        )
        self._item_sessions.sort_indices()
        self._t_ref = int(log.last_time.max())
        return self

    # Hooks ---------------------------------------------------------------------------------
    def _prefix_weights(self, last_pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _similarity(
        self, dot: np.ndarray, row: np.ndarray, session: np.ndarray, prefix: _PrefixInfo
    ) -> np.ndarray:
        raise NotImplementedError

    def _contributions(self, nb: _Neighbours, ex: _Expanded, prefix: _PrefixInfo) -> np.ndarray:
        raise NotImplementedError

    # Pipeline ------------------------------------------------------------------------------
    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._log is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        n_rows = len(prefixes)
        rows, items, pos, lengths = _prefix_arrays(prefixes, self.n_items, self.name)
        d_row, d_item, d_pos = _last_occurrences(rows, items, pos, self.n_items)
        weights = self._prefix_weights(d_pos, lengths[d_row])
        prefix = _PrefixInfo(
            length=lengths,
            n_distinct=np.bincount(d_row, minlength=n_rows),
            sq_norm=np.bincount(d_row, weights=weights * weights, minlength=n_rows),
            key=d_row * self.n_items + d_item,
            last_pos=d_pos,
        )
        query = sp.csr_matrix(
            (weights, d_item, np.r_[0, np.cumsum(prefix.n_distinct)]), shape=(n_rows, self.n_items)
        )
        candidates = (query @ self._item_sessions).tocsr()
        candidates.sort_indices()
        # Recent sampling: sessions are indexed by recency, so keep each row's last entries.
        c_rows = _csr_rows(candidates)
        keep = np.arange(len(c_rows)) >= np.repeat(
            candidates.indptr[1:] - self.sample_size, np.diff(candidates.indptr)
        )
        c_rows, c_sess, c_dot = c_rows[keep], candidates.indices[keep], candidates.data[keep]
        sim = self._similarity(c_dot, c_rows, c_sess, prefix)
        top = _top_per_row(c_rows, sim, c_sess, k=self.k)
        nb = _Neighbours(row=c_rows[top], session=c_sess[top].astype(np.int64), sim=sim[top])
        ex = self._expand(nb, prefix)
        contrib = self._contributions(nb, ex, prefix)
        evidence = sp.coo_matrix(
            (contrib, (nb.row[ex.pair], ex.item)), shape=(n_rows, self.n_items)
        ).tocsr()
        return self._densify(evidence, resolution=None)

    def _expand(self, nb: _Neighbours, prefix: _PrefixInfo) -> _Expanded:
        lengths = self._sd_len[nb.session]
        starts = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        pair = np.repeat(np.arange(len(nb.session), dtype=np.int64), lengths)
        idx = np.arange(total, dtype=np.int64) + np.repeat(
            self._sd_ptr[nb.session] - starts, lengths
        )
        item = self._sd_items[idx]
        key = nb.row[pair] * self.n_items + item
        at = np.minimum(np.searchsorted(prefix.key, key), max(len(prefix.key) - 1, 0))
        found = prefix.key[at] == key if len(prefix.key) else np.zeros(total, dtype=bool)
        prefix_pos = np.where(found, prefix.last_pos[at] if len(prefix.key) else 0, 0)
        return _Expanded(
            pair=pair, starts=starts, item=item, nb_pos=self._sd_pos[idx], prefix_pos=prefix_pos
        )


class VSKNN(_SessionKNN):
    """V-SKNN (Ludewig & Jannach 2018), with session-rec's VMContextKNN semantics.

    - Prefix vector: the item at 1-based position p of a length-L prefix weighs p / L (``weighting
      ='div'``, a linear decay: the last click weighs 1; a repeated item keeps its last position),
      or 1 (``'same'``). Note session-rec names this linear decay 'div'.
    - Similarity to a neighbour = dot product of that vector with the neighbour's binary item
      vector, divided by the number of distinct prefix items (session-rec's ``vec``; the divisor is
      constant per prefix, so this ranks neighbours exactly like the paper's dot product).
    - Score of item i = sum over the k neighbours containing i of sim * decay, where decay =
      1 / d (``weighting_score='div'``) or 1 (``'same'``), d = distance from the end of the prefix
      (1 = last click) of the most recent prefix click whose item occurs in that neighbour.
      Prefix items themselves can be recommended (session-rec's remind=True).
    """

    name = "vsknn"

    def __init__(
        self,
        n_items: int,
        k: int = 100,
        sample_size: int = 500,
        weighting: str = "div",
        weighting_score: str = "div",
    ) -> None:
        super().__init__(n_items, k, sample_size)
        self.weighting = _choice(self.name, "weighting", weighting, ("div", "same"))
        self.weighting_score = _choice(
            self.name, "weighting_score", weighting_score, ("div", "same")
        )

    def _prefix_weights(self, last_pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        if self.weighting == "same":
            return np.ones(len(last_pos))
        return last_pos / length

    def _similarity(
        self, dot: np.ndarray, row: np.ndarray, session: np.ndarray, prefix: _PrefixInfo
    ) -> np.ndarray:
        return dot / prefix.n_distinct[row]

    def _contributions(self, nb: _Neighbours, ex: _Expanded, prefix: _PrefixInfo) -> np.ndarray:
        if len(ex.pair) == 0:
            return np.zeros(0)
        if self.weighting_score == "same":
            return nb.sim[ex.pair]
        newest = np.maximum.reduceat(ex.prefix_pos, ex.starts)  # >= 1: neighbours share an item
        distance = prefix.length[nb.row] - newest + 1
        return (nb.sim / distance)[ex.pair]


class STAN(_SessionKNN):
    """STAN (Garg et al., SIGIR 2019): session kNN with three exponential decays.

    - Prefix vector: the item at position p of a length-L prefix weighs exp((p - L) / lambda_spw)
      (last click 1; a repeated item keeps its last position).
    - Similarity = cosine between that vector and the neighbour's binary item vector
      (dot / (||prefix|| * sqrt(distinct neighbour items))), times the neighbour recency
      exp(-(t_ref - t_n) / lambda_snh), t_n = the neighbour's last click and lambda_snh in days.
      Prefixes carry no time, so t_ref = the latest train click (session-rec uses the current
      click time); the recency weight is then a fixed prior per train session.
    - Score of item i = sum over the k neighbours n containing i of
      sim * exp(-|pos(i, n) - pos(i*, n)| / lambda_inh), where pos is the last 1-based position in
      n and i* is the shared item that occurs latest in n (as in session-rec's implementation).
      Prefix items themselves can be recommended.
    A lambda of None switches its factor off.
    """

    name = "stan"

    def __init__(
        self,
        n_items: int,
        k: int = 500,
        sample_size: int = 5000,
        lambda_spw: float | None = 1.02,
        lambda_snh: float | None = 5.0,
        lambda_inh: float | None = 2.05,
    ) -> None:
        super().__init__(n_items, k, sample_size)
        self.lambda_spw = _positive_float(self.name, "lambda_spw", lambda_spw, allow_none=True)
        self.lambda_snh = _positive_float(self.name, "lambda_snh", lambda_snh, allow_none=True)
        self.lambda_inh = _positive_float(self.name, "lambda_inh", lambda_inh, allow_none=True)

    def _prefix_weights(self, last_pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        if self.lambda_spw is None:
            return np.ones(len(last_pos))
        return np.exp((last_pos - length) / self.lambda_spw)

    def _similarity(
        self, dot: np.ndarray, row: np.ndarray, session: np.ndarray, prefix: _PrefixInfo
    ) -> np.ndarray:
        assert self._log is not None
        sim = dot / (np.sqrt(prefix.sq_norm[row]) * np.sqrt(self._sd_len[session]))
        if self.lambda_snh is not None:
            age = (self._t_ref - self._log.last_time[session]).astype(np.float64)
            sim = sim * np.exp(-age / (self.lambda_snh * _MS_PER_DAY))
        return sim

    def _contributions(self, nb: _Neighbours, ex: _Expanded, prefix: _PrefixInfo) -> np.ndarray:
        if len(ex.pair) == 0:
            return np.zeros(0)
        if self.lambda_inh is None:
            return nb.sim[ex.pair]
        shared_pos = np.where(ex.prefix_pos > 0, ex.nb_pos, 0)
        anchor = np.maximum.reduceat(shared_pos, ex.starts)[ex.pair]
        return nb.sim[ex.pair] * np.exp(-np.abs(ex.nb_pos - anchor) / self.lambda_inh)


# --------------------------------------------------------------------------- registry

BASELINES: dict[str, type[Recommender]] = {
    "pop": Pop,
    "spop": SPop,
    "iknn": ItemKNN,
    "vsknn": VSKNN,
    "stan": STAN,
    "sr": SequentialRules,
}


def baseline_params(kind: str) -> dict[str, Any]:
    """Accepted parameters of a baseline with their defaults (for configs and error messages)."""
    if kind not in BASELINES:
        raise RecsysError(f"unknown baseline {kind!r}; known baselines: {sorted(BASELINES)}")
    signature = inspect.signature(BASELINES[kind].__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in ("self", "n_items")
    }


def make_baseline(kind: str, n_items: int, params: dict[str, Any]) -> Recommender:
    """Build a baseline by name, rejecting unknown parameters instead of silently ignoring them."""
    accepted = baseline_params(kind)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RecsysError(
            f"baseline {kind!r} has no parameter(s) {unknown}; accepted parameters: "
            f"{sorted(accepted) or 'none'}"
        )
    return BASELINES[kind](n_items, **params)
