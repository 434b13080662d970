"""The register step: register the train step's logged model (the MLflow pyfunc), move the aliases.

``champion`` moves to the new version only if it beats the current champion on the configured
metric (default MRR@20 on test); otherwise the new version becomes ``challenger``. ``--promote``
forces the move. A rerun for the same trained model reuses its version (matched by the model
file's fingerprint), so a failure halfway never leaves duplicate versions behind. The version is
of the logged model the train run made (one copy of the weights); only a model trained without
tracking is logged here first.
"""

from __future__ import annotations

from typing import Any

from pipelines.evaluate import GRU4REC, eval_key, read_results
from pipelines.tracking import TAG_DATA, TAG_MODEL, Tracker, find_logged_model, guard
from pipelines.train import log_model, trained_meta
from recsys.config import Config
from recsys.core.errors import RecsysError
from recsys.data.preparation import load_prepared
from recsys.serving.mlflow_store import CHALLENGER, CHAMPION

METRIC_TAG = "recsys.metric."


def _existing_version(client: Any, name: str, fingerprint: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get(TAG_MODEL) == fingerprint:
            return v
    return None


def _logged_model_id(version: Any) -> str | None:
    """The logged model a version was registered from (SQLite's registry keeps it only in the
    version's source, ``models:/<model id>``)."""
    if version.model_id:
        return str(version.model_id)
    source = str(version.source or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def run_register(config: Config, tracker: Tracker, promote: bool = False) -> dict[str, Any]:
    import mlflow

    data = load_prepared(config.prepared_dir)
    meta = trained_meta(config, data)
    key = eval_key(config, meta["model_fingerprint"], data.stats["fingerprint"])
    results = read_results(config, key)
    if results is None:
        raise RecsysError(
            "the evaluation is missing or belongs to another model; run `recsys evaluate` first"
        )
    metric = config.registry.metric
    row = next(r for r in results["rows"] if r["model"] == GRU4REC)
    # the config checked at load that the gate's cut-off is among evaluation.cutoffs
    value = float(row[metric])
    client = tracker.client
    name = config.registered_model_name
    fingerprint = meta["model_fingerprint"]

    with tracker.step("register", ("model", "train", "registry")) as run:
        version = _existing_version(client, name, fingerprint)
        reused = version is not None
        if version is None:
            found = find_logged_model(client, tracker.experiment_id, fingerprint)
            model_id = found.model_id if found is not None else log_model(config, data, meta)
            tags = {
                TAG_MODEL: fingerprint,
                TAG_DATA: data.stats["fingerprint"],
                _metric_tag(metric): str(value),
            }
            with guard("registering the model version"):
                version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
        model_id = _logged_model_id(version)
        if model_id is not None:
            run.inputs(model_ids=[model_id])
        decision, previous = _decide(client, name, version, metric, value, promote)
        run.tags({"recsys.decision": decision, "recsys.model_version": str(version.version)})
        run.metrics(
            {f"candidate.{metric}": value}
            | ({f"champion.{metric}": previous} if previous is not None else {})
        )
    outcome = {
        "name": name,
        "version": int(version.version),
        "metric": metric,
        "value": value,
        "champion_value": previous,
        "decision": decision,
        "reused": reused,
    }
    print(describe(outcome))
    return outcome


def _decide(
    client: Any, name: str, version: Any, metric: str, value: float, promote: bool
) -> tuple[str, float | None]:
    current = _champion(client, name)
    previous = None
    if current is not None:
        tag = current.tags.get(_metric_tag(metric))
        previous = float(tag) if tag is not None else None
    with guard("setting the model aliases"):
        if current is not None and str(current.version) == str(version.version):
            return "already champion", previous
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            return "champion (forced by --promote)", previous
        if current is None or previous is None or value > previous:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            return "champion", previous
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        return "challenger", previous


def _metric_tag(metric: str) -> str:
    """Registry tag keys cannot hold '@': ``mrr@20`` -> ``recsys.metric.mrr_at_20``."""
    return METRIC_TAG + metric.replace("@", "_at_")


def describe(outcome: dict[str, Any]) -> str:
    metric = outcome["metric"]
    champ = outcome["champion_value"]
    versus = f"current champion {metric} = {champ:.4f}" if champ is not None else "no champion yet"
    reuse = " (already registered for this model; reused)" if outcome["reused"] else ""
    return (
        f"registered {outcome['name']} version {outcome['version']}{reuse}: "
        f"{metric} = {outcome['value']:.4f}, {versus} -> {outcome['decision']}\n"
        f"load it with: models:/{outcome['name']}@{CHAMPION}"
    )
