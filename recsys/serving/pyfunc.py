"""The MLflow pyfunc wrapper around ``SessionRecommender`` (what ``mlflow models serve`` runs).

Input: a frame with an ``items`` column holding each session's item ids, e.g. the REST body
``{"dataframe_records": [{"items": [1, 2, 3]}, {"items": [4]}], "params": {"k": 20}}``; in
Python also a plain list of item-id lists. Output: one record per session with the top-k ``items``,
their ``scores``, the ``unknown`` ids that were skipped, a ``fallback`` note and ``truncated``:
how many of the session's oldest clicks were dropped (sessions are cut to their last
``RECSYS_MAX_SESSION_CLICKS``, default 1000; the REST body is capped in ``rest_app``).

MLflow's signature check rejects wrongly typed bodies before ``predict`` runs; what it lets
through but we cannot serve (k < 1, a session that is not a list) is raised as an
``MlflowException`` so the server answers 400 with our reason instead of a 500 and a traceback.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.pyfunc.model import PythonModel

from recsys.core.errors import RecsysError
from recsys.serving.mlflow_store import DEFAULT_K, SESSION_COLUMN
from recsys.serving.rest_app import positive_env_int

DEFAULT_THREADS = 1  # see recsys.serving.recommender.set_threads
MAX_SESSION_ENV = "RECSYS_MAX_SESSION_CLICKS"  # `recsys serve --max-session-clicks`
# A session's most recent clicks that are scored; older ones are dropped and the answer's
# ``truncated`` says how many. Real sessions are far shorter; the GRU walks every click, so an
# unbounded session is unbounded work for one request.
DEFAULT_MAX_SESSION_CLICKS = 1000


def truncate_sessions(sessions: list[list[Any]], limit: int) -> tuple[list[list[Any]], list[int]]:
    """Each session cut to its last ``limit`` clicks, and how many clicks each one lost."""
    dropped = [max(0, len(s) - limit) for s in sessions]
    return [s[-limit:] if d else s for s, d in zip(sessions, dropped, strict=True)], dropped


def _sessions(model_input: Any) -> list[list[Any]]:
    """Accept the shapes MLflow hands over: list of lists, a frame, a dict of columns."""
    if isinstance(model_input, pd.DataFrame):
        if SESSION_COLUMN not in model_input.columns:
            raise RecsysError(
                f"expected a column '{SESSION_COLUMN}' of item-id lists, "
                f"got columns {list(model_input.columns)}"
            )
        return [_as_list(v) for v in model_input[SESSION_COLUMN].tolist()]
    if isinstance(model_input, dict):
        if SESSION_COLUMN not in model_input:
            raise RecsysError(
                f"expected a key '{SESSION_COLUMN}' of item-id lists, got {list(model_input)}"
            )
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


def _k(params: dict[str, Any], default: int) -> int:
    from recsys.serving.recommender import positive_k  # torch: only once a model is loaded

    return positive_k(params.get("k", default), "params.k")


class GRU4RecPyfunc(PythonModel):
    """Loads the weights file artifact once; scores a batch of sessions per request."""

    def load_context(self, context: Any) -> None:
        from recsys.serving.recommender import SessionRecommender

        config = context.model_config or {}
        self.recommender = SessionRecommender.load(
            context.artifacts["model"], threads=int(config.get("threads", DEFAULT_THREADS))
        )
        self.default_k = int(config.get("k", DEFAULT_K))
        self.max_clicks = positive_env_int(
            MAX_SESSION_ENV, int(config.get("max_session_clicks", DEFAULT_MAX_SESSION_CLICKS))
        )

    # The input hint is a DataFrame on purpose: MLflow infers no schema from that type (the
    # signature given at logging time stays the contract) and, unlike no hint at all, it does
    # not print its "add type hints" warning on every import.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """One record per session; bad requests become MLflow's 400 with our explanation."""
        from mlflow.exceptions import MlflowException

        params = params or {}
        try:
            k = _k(params, self.default_k)
            exclude = bool(params.get("exclude_seen", False))
            sessions, dropped = truncate_sessions(_sessions(model_input), self.max_clicks)
            recs = self.recommender.recommend_batch(sessions, k, exclude)
        except RecsysError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return [r.as_dict() | {"truncated": d} for r, d in zip(recs, dropped, strict=True)]
