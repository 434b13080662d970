"""Metric names and their one spelling, ``name@k``: evaluation writes them, configs name them.

Evaluation reports every metric at every cut-off under ``metric_name``; a config that names a
metric (the early-stopping target, the registry gate) is checked with ``parse_metric`` when it
is loaded, so a misspelt metric is a config error, not a failed lookup in the middle of a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRICS = ("recall", "mrr", "ndcg")
_SPELLING = re.compile(rf"^({'|'.join(METRICS)})@([1-9][0-9]*)$")


def metric_name(metric: str, k: int) -> str:
    """The one spelling of a metric key: ``recall@20``, ``mrr@20``, ``ndcg@20``, ``coverage@20``."""
    return f"{metric}@{k}"


@dataclass(frozen=True)
class Metric:
    """A ranking metric at a cut-off, as a config names it (``mrr@20``)."""

    name: str
    k: int

    def __str__(self) -> str:
        return metric_name(self.name, self.k)


def parse_metric(text: str) -> Metric:
    """``mrr@20`` -> ``Metric("mrr", 20)``; anything else is a ValueError saying what is accepted."""
    match = _SPELLING.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a metric: expected one of {', '.join(METRICS)} followed by "
            "@K with a cut-off K >= 1, e.g. 'mrr@20'"
        )
    return Metric(match.group(1), int(match.group(2)))
