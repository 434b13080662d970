"""How the pipeline's runs are laid out in MLflow (DESIGN §5): experiments, runs, tags.

The store itself (where it is, how to reach it) is ``recsys.serving.mlflow_store``'s. One
experiment per dataset, marked as a model-training experiment; one parent run per pipeline
invocation and a child run per step. The prepared splits are the runs' dataset inputs (digest:
the data fingerprint), the trained model is an MLflow logged model found again by its
fingerprint tag, and its test metrics are linked to it (docs/mlflow.md).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.cache import config_key
from recsys.config import Config
from recsys.core.errors import RecsysError, first_line
from recsys.data.schema import split_file
from recsys.serving.mlflow_store import artifact_root, connect

if TYPE_CHECKING:
    from recsys.data.preparation import PreparedDataset

TAG_STEP = "recsys.step"
TAG_DATA = "recsys.data_fingerprint"
TAG_CONFIG = "recsys.config_hash"
TAG_COMMIT = "recsys.git_commit"
TAG_CACHED = "recsys.cached"
TAG_MODEL = "recsys.model_fingerprint"
TAG_PRODUCTS = "recsys.products"  # the precision train.matmul resolved to (fp32 or bf16)
TAG_KERNELS = "recsys.kernels"  # what train.kernels resolved to (native or torch)
PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch
# the experiment kind MLflow's UI files a model-training experiment under (not GenAI)
TAG_EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TAG_NOTE = "mlflow.note.content"  # a run's description, Markdown, on its overview page
CONTEXT_TAG = "mlflow.data.context"  # what a run did with a dataset input


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool:
    """Whether the working tree has uncommitted changes (then the commit alone does not
    reproduce a run)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def experiment_id(client: Any, name: str) -> str:
    """The dataset's experiment, created (or restored) as a model-training experiment; one made
    before recsys set the kind gets it now, a kind the user chose is left alone."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if TAG_EXPERIMENT_KIND not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
        return str(exp.experiment_id)
    root = artifact_root()
    location = f"{root}/{name}" if root else None
    tags = {TAG_EXPERIMENT_KIND: MODEL_TRAINING}
    return str(client.create_experiment(name, artifact_location=location, tags=tags))


def find_logged_model(client: Any, experiment: str, model_fingerprint: str) -> Any | None:
    """The experiment's finished logged model of a model file (its fingerprint tag), or None:
    how train reuses, and evaluate and register find, the one logged copy of the weights."""
    with guard("looking up the logged model"):
        found = client.search_logged_models(
            experiment_ids=[experiment],
            filter_string=f"tags.`{TAG_MODEL}` = '{model_fingerprint}'",
            max_results=20,
        )
    from mlflow.entities import LoggedModelStatus

    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return min(ready, key=lambda m: m.creation_timestamp) if ready else None


def split_inputs(
    config: Config, data: PreparedDataset, splits: Sequence[tuple[str, str]]
) -> list[tuple[Any, str]]:
    """Prepared splits as MLflow datasets with the context a run used them in, from
    ``(split, context)`` pairs: name ``<config>.<split>``, digest the data fingerprint, source
    the split's file, schema and row count from the frame."""
    import warnings

    import mlflow.data
    from mlflow.entities import Dataset

    out = []
    for split, context in splits:
        path = (config.prepared_dir / split_file(split)).resolve()
        with guard(f"describing {path} as a dataset"), warnings.catch_warnings():
            # MLflow warns that a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore")
            meta = mlflow.data.from_polars(
                data.split(split),
                source=str(path),
                name=f"{config.name}.{split}",
                digest=data.stats["fingerprint"],
            ).to_dict()
        out.append((Dataset(**meta), context))
    return out


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

    def linked_metrics(
        self, metrics: dict[str, float], model_id: str, dataset: Any | None = None
    ) -> None:
        """Metrics of a logged model (its page lists them), measured on ``dataset``."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        named = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
        items = [
            Metric(_metric_key(k), float(v), now, 0, model_id=model_id, **named)
            for k, v in metrics.items()
        ]
        with guard("logging the model's metrics"):
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def series(self, samples: list[tuple[int, dict[str, float]]]) -> None:
        """Metrics sampled over time (step i at its own timestamp), e.g. the system metrics."""
        from mlflow.entities import Metric

        items = [
            Metric(k, float(v), ts, i)
            for i, (ts, values) in enumerate(samples)
            for k, v in values.items()
        ]
        with guard("logging the system metrics"):
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def inputs(
        self, datasets: Sequence[tuple[Any, str]] = (), model_ids: Sequence[str] = ()
    ) -> None:
        """Dataset inputs with their context (training / validation / test) and model inputs."""
        from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

        entries = [DatasetInput(d, [InputTag(CONTEXT_TAG, c)]) for d, c in datasets]
        models = [LoggedModelInput(m) for m in model_ids]
        with guard("logging the run's inputs"):
            self.client.log_inputs(self.run_id, datasets=entries or None, models=models or None)

    def output(self, model_id: str) -> None:
        """Mark a logged model made by an earlier run as this run's output as well."""
        from mlflow.entities import LoggedModelOutput

        with guard("logging the run's model"):
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, 0)])

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table artifact: sortable in the run's Artifacts view."""
        import pandas as pd

        with guard(f"logging the table {artifact_file}"):
            self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def describe(self, markdown: str) -> None:
        """The run's description (Markdown, shown on its overview page)."""
        self.tags({TAG_NOTE: markdown})


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
