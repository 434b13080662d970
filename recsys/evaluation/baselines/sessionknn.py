"""Session kNN: V-SKNN and STAN, which score the items of the train sessions nearest the prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.config import STANParams, VSKNNParams
from recsys.core.errors import RecsysError
from recsys.evaluation.baselines.common import (
    Baseline,
    SessionLog,
    csr_rows,
    last_occurrences,
    prefix_arrays,
    read_log,
    top_per_row,
)

_MS_PER_DAY = 86_400_000


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


class _SessionKNN(Baseline):
    """Shared machinery of V-SKNN and STAN: recent-sample neighbour search by sparse products.

    Candidates of a prefix are the train sessions that contain any prefix item; the
    ``sample_size`` most recent of them (by last click time) are kept, their similarity to the
    prefix is computed, and the ``k`` most similar (ties: more recent) become neighbours. Subclasses
    define the prefix item weights, the similarity and each neighbour item's contribution.
    """

    def __init__(self, n_items: int, params: VSKNNParams | STANParams) -> None:
        super().__init__(n_items)
        self.params = params
        self._log: SessionLog | None = None

    def fit(self, train: pl.DataFrame) -> _SessionKNN:
        log = read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        sess, items, pos = last_occurrences(
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
        rows, items, pos, lengths = prefix_arrays(prefixes, self.n_items, self.name)
        d_row, d_item, d_pos = last_occurrences(rows, items, pos, self.n_items)
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
        c_rows = csr_rows(candidates)
        keep = np.arange(len(c_rows)) >= np.repeat(
            candidates.indptr[1:] - self.params.sample_size, np.diff(candidates.indptr)
        )
        c_rows, c_sess, c_dot = c_rows[keep], candidates.indices[keep], candidates.data[keep]
        sim = self._similarity(c_dot, c_rows, c_sess, prefix)
        top = top_per_row(c_rows, sim, c_sess, k=self.params.k)
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

    params: VSKNNParams

    def __init__(self, n_items: int, params: VSKNNParams | None = None) -> None:
        super().__init__(n_items, VSKNNParams() if params is None else params)

    def _prefix_weights(self, last_pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        if self.params.weighting == "same":
            return np.ones(len(last_pos))
        return last_pos / length

    def _similarity(
        self, dot: np.ndarray, row: np.ndarray, session: np.ndarray, prefix: _PrefixInfo
    ) -> np.ndarray:
        return dot / prefix.n_distinct[row]

    def _contributions(self, nb: _Neighbours, ex: _Expanded, prefix: _PrefixInfo) -> np.ndarray:
        if len(ex.pair) == 0:
            return np.zeros(0)
        if self.params.weighting_score == "same":
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

    params: STANParams

    def __init__(self, n_items: int, params: STANParams | None = None) -> None:
        super().__init__(n_items, STANParams() if params is None else params)

    def _prefix_weights(self, last_pos: np.ndarray, length: np.ndarray) -> np.ndarray:
        if self.params.lambda_spw is None:
            return np.ones(len(last_pos))
        return np.exp((last_pos - length) / self.params.lambda_spw)

    def _similarity(
        self, dot: np.ndarray, row: np.ndarray, session: np.ndarray, prefix: _PrefixInfo
    ) -> np.ndarray:
        assert self._log is not None
        sim = dot / (np.sqrt(prefix.sq_norm[row]) * np.sqrt(self._sd_len[session]))
        if self.params.lambda_snh is not None:
            age = (self._t_ref - self._log.last_time[session]).astype(np.float64)
            sim = sim * np.exp(-age / (self.params.lambda_snh * _MS_PER_DAY))
        return sim

    def _contributions(self, nb: _Neighbours, ex: _Expanded, prefix: _PrefixInfo) -> np.ndarray:
        if len(ex.pair) == 0:
            return np.zeros(0)
        if self.params.lambda_inh is None:
            return nb.sim[ex.pair]
        shared_pos = np.where(ex.prefix_pos > 0, ex.nb_pos, 0)
        anchor = np.maximum.reduceat(shared_pos, ex.starts)[ex.pair]
        return nb.sim[ex.pair] * np.exp(-np.abs(ex.nb_pos - anchor) / self.params.lambda_inh)
