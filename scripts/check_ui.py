"""``make check-ui``: the MLflow UI as a person sees it, rendered by headless Chromium.

Starts ``mlflow ui`` on 127.0.0.1 against the project's store (or ``MLFLOW_TRACKING_URI``'s),
renders the pages docs/mlflow.md shows for the config's latest pipeline run, checks that each
rendered page holds what it should (the Training runs view and the run names, the run's
description, the logged model with its test metrics), optionally saves screenshots, and stops
the server by its process id. Exit status 1 names what a page lacked.

    python scripts/check_ui.py --config configs/default.yaml [--screenshots docs/images]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from recsys.config import load_config
from recsys.core.errors import RecsysError, describe_failure, first_line
from recsys.serving.mlflow_store import CHAMPION, QUIET_ENV, quiet_environment, tracking_uri

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 90  # `mlflow ui` takes ~10 s on two busy cores
RENDER_BUDGET_MS = 15000  # virtual time the page's scripts get before the DOM is read
WINDOW = "1600,1000"
MODEL_TRAINING = "workflowType=machine_learning"  # the UI's Model training view


@dataclass(frozen=True)
class Page:
    name: str  # also the screenshot's file name: mlflow-<name>.png
    route: str  # the part after '#'
    expected: tuple[str, ...]  # texts the rendered DOM must hold
    shot: bool = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--screenshots", type=Path, help="save mlflow-<page>.png here")
    args = parser.parse_args()
    try:
        return check(args.config, args.screenshots)
    except BaseException as exc:  # noqa: BLE001 - one line, as the recsys commands say it
        line, code = describe_failure(exc, sys.argv)
        print(f"error: {line}", file=sys.stderr)
        return code


def check(config_path: Path, shots: Path | None) -> int:
    quiet_environment()
    config = load_config(config_path)
    uri = store_uri()
    browser = find_browser()
    pages = pages_of(uri, config.name, config.registered_model_name)
    failed = 0
    with ui_server(uri) as base, tempfile.TemporaryDirectory() as profile:
        for page in pages:
            dom = render(browser, f"{base}/#{page.route}", profile, "--dump-dom")
            missing = [text for text in page.expected if text not in dom]
            failed += bool(missing)
            status = "ok  " if not missing else "FAIL"
            detail = f"missing {missing}" if missing else f"found {list(page.expected)}"
            print(f"{status} {page.name}: #{page.route} {detail}")
            if shots is not None and page.shot:
                shots.mkdir(parents=True, exist_ok=True)
                out = (shots / f"mlflow-{page.name}.png").resolve()
                render(browser, f"{base}/#{page.route}", profile, f"--screenshot={out}")
                print(f"     screenshot {out}")
    return 1 if failed else 0


def store_uri() -> str:
    """The store to browse; a missing default store is an error, not a new empty one."""
    uri = tracking_uri(create=False)  # MLFLOW_TRACKING_URI, or mlops/mlflow.db if it exists
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and (not db.is_file() or db.stat().st_size == 0):
        raise RecsysError(f"no MLflow store at {db}; run `make pipeline` first")
    return uri


def pages_of(uri: str, experiment: str, registered: str) -> list[Page]:
    """The pages of the config's latest pipeline run and of its champion's logged model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RecsysError(f"{uri}: no experiment '{experiment}'; run `make pipeline` first")
    eid = exp.experiment_id
    parents = client.search_runs(
        [eid], "tags.`recsys.step` = 'pipeline'", order_by=["attributes.start_time DESC"]
    )
    if not parents:
        raise RecsysError(f"experiment '{experiment}' has no pipeline run; run `make pipeline`")
    parent = parents[0]
    steps = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = {r.data.tags.get("recsys.step"): r for r in steps}
    try:
        version = client.get_model_version_by_alias(registered, CHAMPION)
    except MlflowException as exc:
        raise RecsysError(f"no champion of {registered}: {first_line(exc)}") from None
    model_id = str(version.source).removeprefix("models:/")
    run_page = f"/experiments/{eid}/runs/{{}}?{MODEL_TRAINING}"
    artifact_page = f"/experiments/{eid}/runs/{{}}/artifacts/{{}}?{MODEL_TRAINING}"
    return [
        # a fresh browser is in the GenAI view: its runs tab is called Training runs
        Page(
            "training-runs",
            f"/experiments/{eid}/runs",
            ("Training runs", parent.info.run_name),
            shot=False,
        ),
        Page(
            "experiment",
            f"/experiments/{eid}?{MODEL_TRAINING}",
            # the Model training view's side bar has the registry; the GenAI one has not
            ("Runs - Experiment", "Model registry", parent.info.run_name, "Dataset", "Models"),
        ),
        Page(
            "pipeline-run",
            run_page.format(parent.info.run_id),
            (parent.info.run_name, "GRU4Rec and the baselines on", "Registry:", "Reproduce"),
        ),
        Page(
            "evaluate-run",
            run_page.format(names["evaluate"].info.run_id),
            ("evaluate", f"{experiment}.test", "gru4rec.mrr_at_20"),
            shot=False,
        ),
        Page(
            "results-table",
            artifact_page.format(names["evaluate"].info.run_id, "results_table.json"),
            ("results_table.json", "View as table", "gru4rec", "recall@20"),
        ),
        Page(
            "leaderboard",
            artifact_page.format(names["evaluate"].info.run_id, "metrics.png"),
            ("metrics.png", "metrics_at_k.png"),
        ),
        Page(
            "model",
            f"/experiments/{eid}/models/{model_id}?{MODEL_TRAINING}",
            (registered, "gru4rec.mrr_at_20", f"{experiment}.test", "train", "evaluate"),
        ),
    ]


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise RecsysError("no headless browser: install Chromium (Debian: apt-get install chromium)")


def render(browser: str, url: str, profile: str, mode: str) -> str:
    """The page after its scripts ran: the DOM (``--dump-dom``) or a screenshot."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW}",
        f"--virtual-time-budget={RENDER_BUDGET_MS}",
        "--hide-scrollbars",
        mode,
        url,
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise RecsysError(f"{browser} did not finish rendering {url} in 120 s") from None
    if out.returncode != 0:
        raise RecsysError(f"{browser} failed on {url}: {first_line(out.stderr or 'no output')}")
    return out.stdout


@contextlib.contextmanager
def ui_server(uri: str) -> Iterator[str]:
    """``mlflow ui`` on a free loopback port, stopped (its process group, by its PID) after."""
    mlflow = Path(sys.executable).parent / "mlflow"
    if not mlflow.is_file():
        raise RecsysError(f"{mlflow}: mlflow is not installed in this environment")
    port = free_port()
    command = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    env = {**QUIET_ENV, **os.environ, "PATH": f"{mlflow.parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_up(proc, f"{base}/health", log)
            yield base
        finally:
            stop(proc)


def wait_until_up(proc: subprocess.Popen[str], url: str, log: IO[str]) -> None:
    """Poll the server's health URL; its last log line if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            lines = [line for line in log.read().splitlines() if line.strip()]
            raise RecsysError(f"mlflow ui exited: {lines[-1] if lines else 'no output'}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RecsysError(f"mlflow ui did not answer {url} within {START_TIMEOUT_S} s")


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
