"""The ``evaluation.fusion`` section: extra rows of the results table (recsys/evaluation/fusion.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from recsys.config.fields import FiniteFloat, Section


class FusionConfig(Section):
    """Fusions of GRU4Rec as extra rows of the results table; each weight is chosen on valid
    (a GRU4Rec trained on train_tr) by ``registry.metric``."""

    # GRU4Rec + w·log(1 + count in the session): the weights to try; empty = no such row
    bonus_weights: list[Annotated[FiniteFloat, Field(ge=0)]] = []
    # a late fusion with this configured baseline (e.g. stan); None = no such row
    hybrid_baseline: str | None = None
    hybrid_weights: list[Annotated[FiniteFloat, Field(ge=0, le=1)]] = [i / 10 for i in range(10)]
    # GRU4Rec's scores enter the hybrid as softmax(scores / T), T tried from this list together
    # with each weight. 1 suits a network trained by cross-entropy; BPR-max/TOP1-max scores are
    # no log-probabilities (on Diginetica softmax(scores) is nearly uniform: its top item has
    # p ~ 0.0003), so they need a T well below 1 for the mix to be more than the baseline.
    hybrid_temperatures: list[Annotated[FiniteFloat, Field(gt=0)]] = [1.0]

    @property
    def enabled(self) -> bool:
        return bool(self.bonus_weights) or self.hybrid_baseline is not None
