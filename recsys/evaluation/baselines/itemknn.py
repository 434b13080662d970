"""Item-kNN: the items most similar to the session's last click (co-occurrence in sessions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.config import ItemKNNParams
from recsys.core.errors import RecsysError
from recsys.evaluation.baselines.common import (
    Baseline,
    csr_rows,
    last_occurrences,
    prefix_arrays,
    read_log,
    top_per_row,
)


class ItemKNN(Baseline):
    """Item-kNN (GRU4Rec paper / session-rec ItemKNN): neighbours of the last clicked item.

    sim(a, b) = co(a, b) / ((supp_a + lmbd)^alpha * (supp_b + lmbd)^(1 - alpha)), where co is the
    number of train sessions containing both items and supp the number containing each one (binary
    session-item incidence; session-rec counts a's clicks instead, which differs only for repeated
    clicks). ``lmbd`` damps rare items' incidental co-occurrences; ``alpha=0.5`` is cosine. Only
    the ``n_sims`` most similar items of each item keep a score (ties at the cut: more popular,
    then lower index). The item itself scores 0. Scores depend only on the last prefix item.
    """

    name = "iknn"

    def __init__(self, n_items: int, params: ItemKNNParams | None = None) -> None:
        super().__init__(n_items)
        self.params = ItemKNNParams() if params is None else params
        self._sims: sp.csr_matrix | None = None

    def fit(self, train: pl.DataFrame) -> ItemKNN:
        log = read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        sess, items, _ = last_occurrences(
            log.event_session(), log.items, log.event_position(), self.n_items
        )
        incidence = sp.csr_matrix(
            (np.ones(len(items)), (sess, items)), shape=(log.n_sessions, self.n_items)
        )
        co = (incidence.T @ incidence).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        supp = np.bincount(items, minlength=self.n_items).astype(np.float64) + self.params.lmbd
        rows = csr_rows(co)
        norm = np.power(supp[rows], self.params.alpha) * np.power(
            supp[co.indices], 1.0 - self.params.alpha
        )
        sims = co.data / np.where(norm > 0, norm, 1.0)
        keep = top_per_row(rows, sims, self._pop()[co.indices], -co.indices, k=self.params.n_sims)
        self._sims = sp.csr_matrix(
            (sims[keep], (rows[keep], co.indices[keep])), shape=(self.n_items, self.n_items)
        )
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._sims is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        _, items, _, lengths = prefix_arrays(prefixes, self.n_items, self.name)
        last = items[np.cumsum(lengths) - 1]
        return self._densify(self._sims[last], resolution=None)
