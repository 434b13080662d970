"""POP and S-POP: global popularity, and popularity after the session's own repeated items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from recsys.config import NoParams
from recsys.core.errors import RecsysError
from recsys.evaluation.baselines.common import Baseline, prefix_arrays, read_log


class Pop(Baseline):
    """POP: the most clicked train items, identical for every session.

    The weakest sensible recommender; any model that does not beat it learned nothing about
    sequences. Score = train click count (items never clicked score 0, all tied).
    """

    name = "pop"

    def __init__(self, n_items: int, params: NoParams | None = None) -> None:
        super().__init__(n_items)
        self.params = NoParams() if params is None else params
        self._counts: np.ndarray | None = None

    def fit(self, train: pl.DataFrame) -> Pop:
        log = read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        counts = np.bincount(log.items, minlength=self.n_items).astype(np.float32)
        self._counts = counts
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._counts is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        prefix_arrays(prefixes, self.n_items, self.name)  # same input validation as the others
        return torch.from_numpy(np.tile(self._counts, (len(prefixes), 1)))


class SPop(Baseline):
    """S-POP: items already clicked in the session first (by click count), then global popularity.

    Captures repeat views, which are frequent in e-commerce logs. Score = number of times the item
    occurs in the prefix + pop / (max_pop + 1), so the popularity term (< 1) only orders items with
    equal in-session counts.
    """

    name = "spop"

    def __init__(self, n_items: int, params: NoParams | None = None) -> None:
        super().__init__(n_items)
        self.params = NoParams() if params is None else params

    def fit(self, train: pl.DataFrame) -> SPop:
        self._fit_popularity(read_log(train, self.n_items, self.name))
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        pop = self._pop()
        rows, items, _, _ = prefix_arrays(prefixes, self.n_items, self.name)
        out = np.tile(pop.astype(np.float32), (len(prefixes), 1))
        key, counts = np.unique(rows * self.n_items + items, return_counts=True)
        r, i = np.divmod(key, self.n_items)
        out[r, i] = (counts + pop[i]).astype(np.float32)
        return torch.from_numpy(out)
