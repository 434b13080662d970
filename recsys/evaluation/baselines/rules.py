"""Sequential rules: weighted "a is followed by b" rules of the train sessions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys.config import SequentialRulesParams
from recsys.core.errors import RecsysError
from recsys.evaluation.baselines.common import (
    Baseline,
    csr_rows,
    prefix_arrays,
    read_log,
    top_per_row,
)


class SequentialRules(Baseline):
    """SR (Ludewig & Jannach 2018): weighted "a is followed by b" rules, scored by the last item.

    Every pair of clicks (a at position p, b at position p + d) of a train session with
    1 <= d <= ``steps`` adds weight(d) to rule a -> b, where 'div' = 1/d, 'same' = 1 and
    'quadratic' = 1/d^2 (repeats a -> a count too). Each item keeps its ``pruning`` heaviest rules
    (ties: more popular target, then lower index; 0 keeps all). The score of b after a prefix is
    the weight of rule last -> b. Rule weights are multiples of 1/lcm(weight denominators), so the
    tie-breaker is kept below a quarter of that resolution.
    """

    name = "sr"

    def __init__(self, n_items: int, params: SequentialRulesParams | None = None) -> None:
        super().__init__(n_items)
        self.params = SequentialRulesParams() if params is None else params
        self._rules: sp.csr_matrix | None = None

    def _weight(self, d: int) -> float:
        return {"div": 1.0 / d, "same": 1.0, "quadratic": 1.0 / (d * d)}[self.params.weighting]

    def _resolution(self) -> float:
        if self.params.weighting == "same":
            return 1.0
        denominators = range(1, self.params.steps + 1)
        if self.params.weighting == "quadratic":
            denominators = [d * d for d in denominators]
        return 1.0 / math.lcm(*denominators)

    def fit(self, train: pl.DataFrame) -> SequentialRules:
        log = read_log(train, self.n_items, self.name)
        self._fit_popularity(log)
        session = log.event_session()
        src, dst, weight = [], [], []
        for d in range(1, self.params.steps + 1):
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
        if self.params.pruning:
            rows = csr_rows(rules)
            targets = rules.indices
            keep = top_per_row(
                rows, rules.data, self._pop()[targets], -targets, k=self.params.pruning
            )
            rules = sp.csr_matrix(
                (rules.data[keep], (rows[keep], rules.indices[keep])), shape=rules.shape
            )
        self._rules = rules
        return self

    def score_next(self, prefixes: Sequence[np.ndarray]) -> torch.Tensor:
        if self._rules is None:
            raise RecsysError(f"baseline {self.name!r}: call fit() before scoring")
        _, items, _, lengths = prefix_arrays(prefixes, self.n_items, self.name)
        last = items[np.cumsum(lengths) - 1]
        return self._densify(self._rules[last], resolution=self._resolution())
