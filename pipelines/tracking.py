"""How the pipeline's runs are laid out in MLflow (DESIGN §5): experiments, runs, tags.

The store itself (where it is, how to reach it) is ``recsys.serving.mlflow_store``'s. One
experiment per dataset, one parent run per pipeline invocation and a child run per step.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.cache import config_key
from recsys.config import Config
from recsys.core.errors import RecsysError, first_line
from recsys.serving.mlflow_store import artifact_root, connect

TAG_STEP = "recsys.step"
TAG_DATA = "recsys.data_fingerprint"
TAG_CONFIG = "recsys.config_hash"
TAG_COMMIT = "recsys.git_commit"
TAG_CACHED = "recsys.cached"
TAG_MODEL = "recsys.model_fingerprint"
TAG_PRODUCTS = "recsys.products"  # the precision train.matmul resolved to (fp32 or bf16)
TAG_KERNELS = "recsys.kernels"  # what train.kernels resolved to (native or torch)
PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    root = artifact_root()
    location = f"{root}/{name}" if root else None
    return str(client.create_experiment(name, artifact_location=location))


class Tracker:
    """Opens the runs of one invocation: a parent (pipeline) and children (steps).

    The store is contacted on first use, after a step has done its work, so a bad input is
    reported without waiting for MLflow, and a failed step leaves no run behind.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.parent_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._commit: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect()
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.config.name)
        return self._experiment_id

    @property
    def commit(self) -> str:
        if self._commit is None:
            self._commit = git_commit()
        return self._commit

    @contextlib.contextmanager
    def parent(self, run_name: str = "pipeline") -> Iterator[str]:
        import mlflow

        with guard("starting the pipeline run"):
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name)
        self.parent_id = run.info.run_id
        try:
            with guard("logging the config"):
                self._log_config(run.info.run_id, {TAG_STEP: "pipeline", TAG_COMMIT: self.commit})
            yield run.info.run_id
        except BaseException:
            mlflow.end_run(status="FAILED")
            self.parent_id = None
            raise
        mlflow.end_run()
        self.parent_id = None

    def _log_config(self, run_id: str, tags: dict[str, str]) -> None:
        """The whole config as params and the run's tags; params in batches of at most 100,
        the most a tracking server takes in one request."""
        params = _params(self.config.flat_params())
        self.client.log_batch(run_id, params=params[:PARAMS_PER_BATCH], tags=_tags(tags))
        for start in range(PARAMS_PER_BATCH, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])

    @contextlib.contextmanager
    def step(self, step: str, config_sections: tuple[str, ...]) -> Iterator[StepRun]:
        """A run for one step: nested in the pipeline's parent run when there is one."""
        import mlflow

        with guard(f"starting the {step} run"):
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=step,
                nested=self.parent_id is not None,
                parent_run_id=self.parent_id,
            )
        handle = StepRun(self.client, run.info.run_id)
        try:
            with guard(f"logging the {step} run"):
                self._log_config(
                    run.info.run_id,
                    {
                        TAG_STEP: step,
                        TAG_COMMIT: self.commit,
                        TAG_CONFIG: config_key(self.config, *config_sections),
                    },
                )
            yield handle
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run()


class StepRun:
    """Thin helpers over one run id, so steps never juggle MLflow's global state."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def tags(self, tags: dict[str, str]) -> None:
        with guard("logging tags"):
            self.client.log_batch(self.run_id, tags=_tags(tags))

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        with guard("logging metrics"):
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with guard(f"logging the artifact {path}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _metric_key(key: str) -> str:
    """MLflow metric names cannot hold '@'; ``recall@20`` is logged as ``recall_at_20``."""
    return key.replace("@", "_at_")


def _params(params: dict[str, str]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params.items()]


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


@contextlib.contextmanager
def guard(action: str) -> Iterator[None]:
    """Turn an MLflow store failure (unreachable, locked) into one clear message."""
    try:
        yield
    except RecsysError:
        raise
    except Exception as exc:  # noqa: BLE001
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException | OSError) or "sqlite" in type(exc).__module__:
            hint = " (the database is locked by another process)" if "locked" in str(exc) else ""
            raise RecsysError(
                f"MLflow failed while {action}{hint}: {first_line(exc)}; local outputs are intact"
            ) from None
        raise
