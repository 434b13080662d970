"""The MLflow pyfunc wrapper around ``SessionRecommender`` (what ``mlflow models serve`` runs).

Input: a frame with an ``items`` column holding each session's item ids, e.g. the REST body
``{"dataframe_records": [{"items": [1, 2, 3]}, {"items": [4]}], "params": {"k": 20}}``; in
Python also a plain list of item-id lists. Output: one record per session with the top-k ``items``,
their ``scores``, the ``unknown`` ids that were skipped and a ``fallback`` note.
"""

from __future__ import annotations

import warnings
from typing import Any

from mlflow.pyfunc.model import PythonModel

from recsys.errors import RecsysError

SESSION_COLUMN = "items"

# The signature given at logging time is the contract; MLflow's nudge towards type hints is noise.
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")


def _sessions(model_input: Any) -> list[list[Any]]:
    """Accept the shapes MLflow hands over: list of lists, a frame, a dict of columns."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with mlflow
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        column = SESSION_COLUMN if SESSION_COLUMN in model_input.columns else model_input.columns[0]
        return [_as_list(v) for v in model_input[column].tolist()]
    if isinstance(model_input, dict) and SESSION_COLUMN in model_input:
        return [_as_list(v) for v in model_input[SESSION_COLUMN]]
    if isinstance(model_input, list | tuple) or hasattr(model_input, "tolist"):
        return [_as_list(v) for v in model_input]
    raise RecsysError(
        f"expected sessions as a list of item-id lists or a frame with an '{SESSION_COLUMN}' "
        f"column, got {type(model_input).__name__}"
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return list(value)
    raise RecsysError(f"each session must be a list of item ids, got {value!r}")


class GRU4RecPyfunc(PythonModel):
    """Loads the weights file artifact once; scores a batch of sessions per request."""

    def load_context(self, context: Any) -> None:
        from recsys.serving import SessionRecommender

        self.recommender = SessionRecommender.load(context.artifacts["model"])
        self.default_k = int((context.model_config or {}).get("k", 20))

    # No type hints on predict: MLflow would derive a (wrong) schema from them; the signature
    # given at logging time is the contract.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        params = params or {}
        k = int(params.get("k", self.default_k))
        exclude = bool(params.get("exclude_seen", False))
        sessions = _sessions(model_input)
        return [r.as_dict() for r in self.recommender.recommend_batch(sessions, k, exclude)]
