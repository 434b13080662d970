"""The fusion rows of the evaluate step: weights chosen on valid, then one look at test.

Each fusion is fitted twice: on train_tr (GRU4Rec from ``Config.valid_model_file``, the
baseline refitted there) to pick its weight on ``valid``, then with the models of full train
(the ones of the GRU4Rec and baseline rows) for the test row. Test never picks anything.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from recsys.config import Config
from recsys.core.metrics import Metric, parse_metric
from recsys.core.progress import step
from recsys.data.preparation import PreparedDataset
from recsys.evaluation.baselines import make_baseline
from recsys.evaluation.fusion import (
    HybridScorer,
    SessionBonusScorer,
    choose_hybrid,
    choose_weight,
)
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import EvaluationResult, evaluate
from recsys.evaluation.scorer import SessionScorer
from recsys.model.artifact import TrainedModel

BONUS = "gru4rec-bonus"
HYBRID = "gru4rec-{}"  # with the baseline's name


def fusion_results(
    config: Config,
    data: PreparedDataset,
    gru: GRU4RecScorer,
    fitted: dict[str, SessionScorer],
    kwargs: dict[str, Any],
) -> list[tuple[EvaluationResult, dict[str, Any]]]:
    """Each configured fusion's test result and what was chosen for it (weight, valid metric)."""
    fusion = config.evaluation.fusion
    metric = parse_metric(config.registry.metric)
    on_tr = GRU4RecScorer(TrainedModel.load(config.valid_model_file).network)
    out: list[tuple[EvaluationResult, dict[str, Any]]] = []
    if fusion.bonus_weights:
        with step(f"{BONUS}: choosing its weight on valid"):
            w, tried = choose_weight(
                lambda w: SessionBonusScorer(on_tr.model, w, on_tr.fast_ranking),
                data.valid,
                fusion.bonus_weights,
                metric,
            )
        result = evaluate(SessionBonusScorer(gru.model, w), data.test, name=BONUS, **kwargs)
        out.append((result, _chosen(w, tried, metric)))
    if fusion.hybrid_baseline is not None:
        name = fusion.hybrid_baseline
        spec = config.evaluation.baselines[name]
        label = HYBRID.format(name)
        with step(f"{label}: fitting {name} on train_tr, choosing the weight on valid"):
            knn_tr = make_baseline(spec.kind, data.n_items, spec.params).fit(data.train_tr)
            grid = list(product(fusion.hybrid_temperatures, fusion.hybrid_weights))
            (t, w), tried_tw = choose_hybrid(on_tr, knn_tr, data.valid, grid, metric)
        result = evaluate(HybridScorer(gru, fitted[name], w, t), data.test, name=label, **kwargs)
        out.append((result, _chosen((t, w), tried_tw, metric)))
    return out


def _chosen(chosen: Any, tried: dict[Any, float], metric: Metric) -> dict[str, Any]:
    """The row's record of its choice: the weight, the hybrid's temperature, the valid score."""
    temperature, weight = chosen if isinstance(chosen, tuple) else (None, chosen)
    record: dict[str, Any] = {"weight": weight}
    if temperature is not None:
        record["temperature"] = temperature
    return record | {f"valid_{metric}": round(tried[chosen], 4), "weights_tried": len(tried)}
