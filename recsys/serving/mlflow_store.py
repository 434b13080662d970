"""Where MLflow lives for this project: the tracking URI convention and a checked connection.

Default store: ``sqlite:///<cwd>/mlops/mlflow.db`` (artifacts in ``mlops/artifacts``);
``MLFLOW_TRACKING_URI`` switches to any tracking server unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recsys.core.errors import RecsysError

DEFAULT_STORE_DIR = Path("mlops")
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def quiet_environment() -> None:
    """No telemetry to a closed network, no INFO chatter; set only what the user did not."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's local SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = DEFAULT_STORE_DIR.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: beside a local SQLite store; a server decides itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def connect() -> Any:
    """Point MLflow at the store and check that it answers; a clear error if it does not."""
    quiet_environment()
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise RecsysError(
            f"MLflow tracking store {uri} is unreachable: {first_line(exc)}"
        ) from None
    return client
