"""Strong non-neural session-based baselines: POP, S-POP, item-kNN, SR, V-SKNN and STAN.

Published comparisons (Ludewig & Jannach 2018; Ludewig et al. 2021) show that these simple
methods often match or beat recurrent models, so GRU4Rec is only credible next to them. Each one
follows its paper and the defaults used by the session-rec framework, re-implemented with sparse
matrices so that a full Diginetica evaluation takes seconds, not hours. Where session-rec's
behaviour and a paper's wording differ, the class docstring says which one is implemented.

One module per family (popularity, itemknn, rules, sessionknn) on ``common``'s shared log, batch
helpers and popularity tie-breaker. The kinds and their typed parameters are the config's
(``recsys.config.BASELINE_PARAMS``), so a bad parameter fails when the config loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recsys.config import BaselineParams, baseline_config
from recsys.evaluation.baselines.common import Baseline
from recsys.evaluation.baselines.itemknn import ItemKNN
from recsys.evaluation.baselines.popularity import Pop, SPop
from recsys.evaluation.baselines.rules import SequentialRules
from recsys.evaluation.baselines.sessionknn import STAN, VSKNN

__all__ = [
    "BASELINES",
    "STAN",
    "VSKNN",
    "Baseline",
    "ItemKNN",
    "Pop",
    "SPop",
    "SequentialRules",
    "make_baseline",
]

# Each class under its kind; tests/test_baselines.py checks these are the config's kinds.
BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (Pop, SPop, ItemKNN, SequentialRules, VSKNN, STAN)
}


def make_baseline(
    kind: str, n_items: int, params: BaselineParams | Mapping[str, Any] | None = None
) -> Baseline:
    """Build a baseline of a kind; plain parameters are checked as the config checks them."""
    spec = baseline_config(kind, params)
    return BASELINES[spec.kind](n_items, spec.params)  # type: ignore[arg-type]
