"""The whole pipeline as one MLflow parent run: prepare -> train -> evaluate -> register."""

from __future__ import annotations

from typing import Any

from pipelines.evaluate import run_evaluate
from pipelines.prepare import run_prepare
from pipelines.register import run_register
from pipelines.tracking import Tracker
from pipelines.train import run_train
from recsys.config import Config
from recsys.serving.mlflow_store import tracking_uri


def run_pipeline(config: Config, force: bool = False, promote: bool = False) -> dict[str, Any]:
    tracker = Tracker(config)
    with tracker.parent(f"pipeline-{config.name}") as run_id:
        stats = run_prepare(config, tracker, force=force)
        meta = run_train(config, tracker, force=force)
        results = run_evaluate(config, tracker, force=force)
        outcome = run_register(config, tracker, promote=promote)
    uri = tracking_uri()
    print(
        "\nwhere to look:\n"
        f"  outputs     {config.run_dir}/ (prepared/, model/, evaluation/metrics.csv, metrics.png)\n"
        f"  MLflow      {uri}  experiment '{config.name}', run {run_id}  (`make ui` to browse)\n"
        f"  model       models:/{outcome['name']}@champion  "
        f"(`make recommend ITEMS=...` or `make serve`)"
    )
    return {"stats": stats, "train": meta, "evaluation": results, "registry": outcome}
