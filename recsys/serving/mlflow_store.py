"""MLflow for this project, defined once: the store, the quiet environment, the logged model.

Default store: ``mlops/mlflow.db`` in the working directory, which is the project folder when
run through ``make`` (artifacts in ``mlops/artifacts``); ``MLFLOW_TRACKING_URI`` switches to any
tracking server unchanged. Every command calls ``quiet_environment`` before MLflow is imported,
and the servers it starts inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.core.errors import RecsysError, first_line

DEFAULT_STORE_DIR = Path("mlops")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # recsys/: shipped as the model's code
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no calls to a closed network
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # `mlflow ui` needs no job runner
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails at once
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no bar per download on stderr
    "GIT_PYTHON_REFRESH": "quiet",
    "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated",  # said by `mlflow ui`
}
CHAMPION, CHALLENGER = "champion", "challenger"  # the registry aliases recsys sets
SESSION_COLUMN = "items"  # the logged model's input: a frame of item-id lists in this column
DEFAULT_K = 20  # its top-k when a request names none
PIP_REQUIREMENTS = [
    "torch==2.13.0",
    "mlflow>=3.17,<3.18",
    "polars>=2.1,<3",
    "numpy>=1.26",
    "pydantic>=2,<3",
    "pyyaml>=6",
]


def quiet_environment() -> None:
    """No telemetry to a closed network, no INFO chatter; set only what the user did not."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tracking_uri(create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store under ``mlops/`` here (created).

    ``create=False`` is for reads (a model to load or serve): a default store that does not
    exist is an error naming where it was looked for, not an empty store made as a side effect.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = DEFAULT_STORE_DIR.resolve()
    if not create and not (store / "mlflow.db").is_file():
        raise RecsysError(
            f"no MLflow store at {store / 'mlflow.db'} (the default store is mlops/mlflow.db "
            f"in the working directory, {Path.cwd()}); run from the project folder or set "
            f"MLFLOW_TRACKING_URI"
        )
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: beside a local SQLite store; a server decides itself."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def connect(create: bool = True) -> Any:
    """Point MLflow at the store and check that it answers; a clear error if it does not
    (``create=False``: a missing default store is an error too, see ``tracking_uri``)."""
    quiet_environment()
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(create)
    try:
        _create_sqlite_whole(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise RecsysError(
            f"MLflow tracking store {uri} is unreachable: {first_line(exc)}"
        ) from None
    return client


def signature(numeric_ids: bool) -> Any:
    """The request schema ``mlflow models serve`` checks: item-id lists, then ``k`` and
    ``exclude_seen``; ids are integers or strings as the catalogue's are."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(Array("long" if numeric_ids else "string"), SESSION_COLUMN)]),
        params=ParamSchema(
            [ParamSpec("k", "long", DEFAULT_K), ParamSpec("exclude_seen", "boolean", False)]
        ),
    )


def log_pyfunc(
    model_file: Path,
    example_sessions: Sequence[list[Any]],
    name: str = "model",
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> Any:
    """Log a trained model file as the pyfunc that ``mlflow models serve`` runs, in the active
    run: an MLflow logged model (``name``, ``tags``, ``params`` on its page) with the
    models-from-code entry point, this package as its code, the request signature and pinned
    requirements. Returns MLflow's ``ModelInfo`` (``model_id``, and ``model_uri`` to register).
    The request signature takes the id kind of the artifact's item index."""
    import mlflow
    import pandas as pd

    from recsys.model.artifact import TrainedModel

    numeric_ids = TrainedModel.load(model_file).items.numeric

    example = pd.DataFrame({SESSION_COLUMN: list(example_sessions)})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PACKAGE_DIR / "serving" / "pyfunc_entry.py"),
        artifacts={"model": str(model_file)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(numeric_ids),
        input_example=(example, {"k": DEFAULT_K}),
        pip_requirements=PIP_REQUIREMENTS,
        model_config={"k": DEFAULT_K},
        tags=tags,
        params=params,
    )


def _create_sqlite_whole(uri: str) -> None:
    """A new SQLite store is made under a temporary name and linked into place whole: MLflow
    builds its schema in a few dozen migrations, and a process killed among them used to leave a
    half-built database that every later command refused. The link fails if another process
    made the store first; then that one is used."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    from mlflow import MlflowClient

    tmp = db.with_name(f".{db.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.link(tmp, db)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def download_model(uri: str, dest: Path) -> Path:
    """Fetch a registered model's weights from MLflow (the pyfunc's ``model`` artifact)."""
    import mlflow

    from recsys.config import MODEL_FILE
    from recsys.model.artifact import find_model_file

    connect(create=False)

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:  # noqa: BLE001 - unknown name/alias, unreachable store
        raise RecsysError(
            f"could not load {uri} from the MLflow store {tracking_uri()}: {first_line(exc)}"
        ) from None
    try:
        return find_model_file(local)
    except RecsysError:
        raise RecsysError(f"{uri}: the MLflow model has no {MODEL_FILE} artifact") from None


def local_artifacts(uri: str) -> Path | None:
    """The directory a ``models:/`` or ``runs:/`` URI's artifacts live in, when the artifact
    store is this machine's file system; None otherwise (or when MLflow cannot resolve it: the
    download path then reports why). Reading the weights there, instead of MLflow's copy on a
    pool of threads, is what keeps a live roll-over from stalling the requests it serves
    alongside (measured: 0.2-0.7 s pauses of a 1 ms heartbeat during the copy)."""
    from urllib.parse import unquote, urlparse

    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    connect(create=False)
    repo = ModelsArtifactRepository if uri.startswith("models:/") else RunsArtifactRepository
    try:
        underlying = urlparse(repo.get_underlying_uri(uri))
    except Exception:  # noqa: BLE001 - unknown name, version or run: the download path says so
        return None
    if underlying.scheme not in ("", "file"):
        return None
    path = Path(unquote(underlying.path))
    return path if path.is_dir() else None


def load_model(uri: str | Path) -> Any:
    """A ``TrainedModel`` from a model file, a directory holding one, or a ``models:/`` or
    ``runs:/`` URI: how every command that takes a model names it."""
    import tempfile

    from recsys.model.artifact import TrainedModel, find_model_file

    text = str(uri)
    if text.startswith(("models:/", "runs:/")):
        in_place = local_artifacts(text)
        if in_place is not None:
            return TrainedModel.load(find_model_file(in_place))
        with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
            return TrainedModel.load(download_model(text, Path(tmp)))
    return TrainedModel.load(find_model_file(Path(text)))
