"""The whole pipeline as one MLflow parent run: prepare -> train -> evaluate -> register."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.evaluate import GRU4REC, results_view, run_evaluate
from pipelines.prepare import run_prepare
from pipelines.register import run_register
from pipelines.report import markdown_table
from pipelines.tracking import StepRun, Tracker, find_logged_model, git_dirty, split_inputs
from pipelines.train import run_train
from recsys.config import Config
from recsys.data.preparation import load_prepared
from recsys.data.schema import TEST, TRAIN
from recsys.serving.mlflow_store import CHAMPION, tracking_uri

UI_PORT = 5000  # `make ui`'s default port
# MLflow 3.17's UI picks its view from the GenAI / Model training switch, not the experiment's
# kind; this query selects Model training, whose experiment page opens on the runs
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_pipeline(
    config: Config, force: bool = False, promote: bool = False, config_path: Path | None = None
) -> dict[str, Any]:
    tracker = Tracker(config)
    with tracker.parent(f"pipeline-{config.name}") as run_id:
        stats = run_prepare(config, tracker, force=force)
        meta = run_train(config, tracker, force=force)
        results = run_evaluate(config, tracker, force=force)
        outcome = run_register(config, tracker, promote=promote)
        parent = StepRun(tracker.client, run_id)
        parent.describe(description(config, config_path, results, outcome, meta, tracker.commit))
        # what the pipeline read and made, on its own row of the runs table too
        data = load_prepared(config.prepared_dir)
        parent.inputs(split_inputs(config, data, [(TRAIN, "training"), (TEST, "test")]))
        model = find_logged_model(tracker.client, tracker.experiment_id, meta["model_fingerprint"])
        if model is not None:
            parent.output(model.model_id)
    uri = tracking_uri()
    print(
        "\nwhere to look:\n"
        f"  outputs     {config.run_dir}/ (prepared/, model/, evaluation/metrics.csv, metrics.png)\n"
        f"  MLflow      {uri}  experiment '{config.name}', run {run_id}\n"
        f"  browse      `make ui`, then {experiment_url(tracker.experiment_id)}\n"
        f"  model       models:/{outcome['name']}@champion  "
        f"(`make recommend ITEMS=...` or `make serve`)"
    )
    return {"stats": stats, "train": meta, "evaluation": results, "registry": outcome}


def experiment_url(experiment_id: str, port: int = UI_PORT) -> str:
    """The experiment's page in the MLflow UI, in its model-training view."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def description(
    config: Config,
    config_path: Path | None,
    results: dict[str, Any],
    outcome: dict[str, Any],
    meta: dict[str, Any],
    commit: str,
) -> str:
    """The pipeline run's description (Markdown): the results, the registry's decision and the
    commands that redo the run; what a person opening the run wants first."""
    head, rows, columns = results_view(results, config)
    metric, champion = outcome["metric"], outcome["champion_value"]
    versus = f"the champion had {champion:.4f}" if champion is not None else "no champion yet"
    reused = " (already registered for this model)" if outcome["reused"] else ""
    config_arg = str(config_path) if config_path is not None else "<your config>"
    dirty = (
        "\n\nMade from a working tree with uncommitted changes: the commit alone does not "
        "reproduce it."
        if git_dirty()
        else ""
    )
    return (
        f"### GRU4Rec and the baselines on `{config.name}`\n\n"
        f"**Registry:** `{outcome['name']}` version {outcome['version']}{reused}, "
        f"{metric} = {outcome['value']:.4f}, {versus}: **{outcome['decision']}**. "
        f"Load it as `models:/{outcome['name']}@{CHAMPION}`.\n\n"
        f"{head}.\n\n{markdown_table(rows, columns, bold=[GRU4REC])}\n\n"
        f"**Reproduce** (data fingerprint `{meta['data_fingerprint']}`, model fingerprint "
        f"`{meta['model_fingerprint']}`):\n\n"
        f"```\ngit checkout {commit}\nmake pipeline CONFIG={config_arg}\n```"
        f"{dirty}"
    )
