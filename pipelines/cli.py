"""The ``recsys`` command line: every pipeline step, scoring, and the benchmarks.

Heavy imports (torch, mlflow) happen inside the commands so that ``recsys --help`` is instant.
Every exception that reaches a command is one ``error:`` line and exit code 1 (``GuardedGroup``,
``recsys.core.errors.describe_failure``); a bug says so and names the log holding its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from pipelines.cli_cells import register as register_cells_command
from pipelines.cli_live import register as register_live_commands
from pipelines.cli_options import config_option
from pipelines.cli_replay import register as register_replay_command

F = TypeVar("F", bound=Callable[..., Any])

CONFIG = config_option()
FORCE = click.option(
    "--force", is_flag=True, help="Redo the step even if its outputs are up to date."
)


def _report(exc: BaseException) -> NoReturn:
    """Any exception that reaches the CLI: one ``error:`` line and its exit code, never a
    traceback (a bug's traceback goes to a log file the line names)."""
    from recsys.core.errors import describe_failure

    message, code = describe_failure(exc, sys.argv)
    click.echo(f"error: {message}" if code != 130 else message, err=True)
    sys.exit(code)


def friendly_errors(func: F) -> F:
    """The guard on one callable (the group applies it to every command; kept for commands that
    run code outside click's invocation)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors and --help: click prints them itself
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one guard
            _report(exc)

    return wrapper  # type: ignore[return-value]


class GuardedGroup(click.Group):
    """The ``recsys`` group: every command, present or added later, runs under the guard."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one guard
            _report(exc)
        except BaseException as exc:  # a Rust panic from polars derives from BaseException
            if isinstance(exc, SystemExit | GeneratorExit):
                raise
            _report(exc)


def _load(config_path: Path) -> Any:
    from recsys.config import load_config

    return load_config(config_path)


def _tracker(config: Any, check_store: bool = True) -> Any:
    """The step's tracker; its store is contacted now, so that an unreachable one is said
    before minutes of training or evaluation, not after them (prepare, cheap, skips this)."""
    from pipelines.tracking import Tracker

    tracker = Tracker(config)
    if check_store:
        tracker.client  # noqa: B018 - connects, or raises the store's one-line error
    return tracker


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recsys")
def main() -> None:
    """Session-based next-item recommendation: GRU4Rec, baselines, MLflow pipelines."""
    from recsys.serving.mlflow_store import quiet_environment

    quiet_environment()


@main.command()
@CONFIG
@FORCE
@friendly_errors
def prepare(config_path: Path, force: bool) -> None:
    """Raw click log -> filtered, time-split dataset (train/test/train_tr/valid + item index)."""
    from pipelines.prepare import run_prepare

    config = _load(config_path)
    run_prepare(config, _tracker(config, check_store=False), force=force)


@main.command()
@CONFIG
@FORCE
@click.option("--resume", is_flag=True, help="Continue from the last epoch checkpoint.")
@click.option("--warm-start", metavar="MODEL", help="Continue from a model file or models:/ URI.")
@click.option("--nproc", type=click.IntRange(min=1), help="Data-parallel processes (train.nproc).")
@friendly_errors
def train(
    config_path: Path, force: bool, resume: bool, warm_start: str | None, nproc: int | None
) -> None:
    """Train GRU4Rec on the prepared train split (or warm, on its newest clicks)."""
    from pipelines.train import run_train, with_nproc
    from pipelines.warm import with_warm_start

    config = with_nproc(with_warm_start(_load(config_path), warm_start), nproc)
    run_train(config, _tracker(config), force=force, resume=resume)


@main.command()
@CONFIG
@FORCE
@friendly_errors
def evaluate(config_path: Path, force: bool) -> None:
    """Evaluate GRU4Rec and the baselines on the test split (next-item, full catalogue)."""
    from pipelines.evaluate import run_evaluate

    config = _load(config_path)
    run_evaluate(config, _tracker(config), force=force)


@main.command()
@CONFIG
@click.option(
    "--promote", is_flag=True, help="Make the new version champion regardless of metrics."
)
@friendly_errors
def register(config_path: Path, promote: bool) -> None:
    """Log the model as an MLflow pyfunc, register it, and move the champion alias if it wins."""
    from pipelines.register import run_register

    config = _load(config_path)
    run_register(config, _tracker(config), promote=promote)


@main.command()
@CONFIG
@FORCE
@click.option("--promote", is_flag=True, help="Force the champion alias onto the new version.")
@friendly_errors
def pipeline(config_path: Path, force: bool, promote: bool) -> None:
    """prepare -> train -> evaluate -> register, tracked as one MLflow parent run."""
    from pipelines.run import run_pipeline

    run_pipeline(_load(config_path), force=force, promote=promote, config_path=config_path)


@main.command()
@CONFIG
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    help="Add this many trials (default: until the study has tune.n_trials finished ones).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Start no new trial after SECONDS (default: tune.timeout_seconds).",
)
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna database shared by several workers (default: sqlite, mlops/optuna.db).",
)
@friendly_errors
def tune(config_path: Path, trials: int | None, timeout: float | None, storage: str | None) -> None:
    """Hyper-parameter search (Optuna) on train_tr/valid -> data/<name>/tuning/best.yaml."""
    from pipelines.tune import run_tune

    config = _load(config_path)
    run_tune(config, _tracker(config), trials=trials, timeout=timeout, storage=storage)


@main.command()
@CONFIG
@click.option(
    "--model", "-m", "model_uri", help="A models:/ or runs:/ URI (default: the config's champion)."
)
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=5055, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="uvicorn workers; above 1, uvicorn issue #3149 adds ~40 ms per keep-alive request.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Larger request bodies get 413, unread.",
)
@click.option(
    "--max-session-clicks",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Longer sessions are cut to their most recent clicks (the answer's 'truncated').",
)
@friendly_errors
def serve(
    config_path: Path,
    model_uri: str | None,
    port: int,
    host: str,
    workers: int,
    max_body_bytes: int,
    max_session_clicks: int,
) -> None:
    """REST server (MLflow's scoring app) for the champion: POST /invocations, docs/serving.md."""
    import os

    from pipelines.serve import champion_uri, check_servable, server_command, server_env
    from recsys.serving.mlflow_store import QUIET_ENV, tracking_uri
    from recsys.serving.pyfunc import MAX_SESSION_ENV
    from recsys.serving.rest_app import MAX_BODY_ENV

    uri = model_uri or champion_uri(_load(config_path))
    limits = {MAX_BODY_ENV: str(max_body_bytes), MAX_SESSION_ENV: str(max_session_clicks)}
    env = {**QUIET_ENV, **os.environ, **limits}
    if uri.startswith(("models:/", "runs:/")):
        # resolved in the project's store unless the user named another; never created here
        env["MLFLOW_TRACKING_URI"] = tracking_uri(create=False)
    command = server_command(uri, port, host, workers)
    check_servable(command, uri, host, port)
    click.echo(f"serving {uri} on http://{host}:{port} (Ctrl-C stops it)", err=True)
    os.execve(command[0], command, server_env(env))


@main.command()
@click.option("--model", "-m", "model_uri", help="Model file/dir or models:/name@alias.")
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Or the champion registered for this config (models:/<registry name>@champion).",
)
@click.option(
    "--items", "-i", required=True, help='Comma-separated item ids of the session, e.g. "a,b,c".'
)
@click.option("-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--exclude-seen", is_flag=True, help="Do not recommend items already in the session.")
@friendly_errors
def recommend(
    model_uri: str | None, config_path: Path | None, items: str, k: int, exclude_seen: bool
) -> None:
    """Top-k next items for one session, as a ranked table."""
    from pipelines.report import format_table
    from pipelines.serve import champion_uri
    from recsys.serving.recommender import SessionRecommender

    if (model_uri is None) == (config_path is None):
        raise click.UsageError("give exactly one of --model/-m and --config/-c")
    uri = model_uri if config_path is None else champion_uri(_load(config_path))
    rec = SessionRecommender.load(uri)
    session = [s.strip() for s in items.split(",") if s.strip()]
    result = rec.recommend(session, k=k, exclude_seen=exclude_seen)
    if result.unknown:
        click.echo(f"skipped unknown item ids: {', '.join(map(str, result.unknown))}", err=True)
    if result.fallback:
        click.echo("no known item in the session: showing the most popular items", err=True)
    rows = [
        # ids as text: the table would print an integer id with thousands separators
        {"rank": i + 1, "item_id": str(item), "score": score}
        for i, (item, score) in enumerate(zip(result.items, result.scores, strict=True))
    ]
    click.echo(format_table(rows, ["rank", "item_id", "score"]))


@main.command()
@click.option(
    "--model", "-m", "model_uri", required=True, help="Model file/dir or models:/name@alias."
)
@click.option(
    "--input", "input_path", required=True, type=click.Path(path_type=Path, dir_okay=False)
)
@click.option(
    "--output", "output_path", required=True, type=click.Path(path_type=Path, dir_okay=False)
)
@click.option("-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--exclude-seen", is_flag=True)
@friendly_errors
def score(
    model_uri: str, input_path: Path, output_path: Path, k: int, batch_size: int, exclude_seen: bool
) -> None:
    """Score a Parquet file of sessions (session_id + items list, or session_id + item_id rows)."""
    from recsys.serving.batch import score_file
    from recsys.serving.recommender import SessionRecommender

    rec = SessionRecommender.load(model_uri)
    summary = score_file(
        rec, input_path, output_path, k=k, batch_size=batch_size, exclude_seen=exclude_seen
    )
    click.echo(
        f"wrote {summary['sessions']:,} sessions to {output_path} "
        f"({summary['unknown']:,} unknown item ids skipped, {summary['fallback']:,} popularity fallbacks)"
    )


@main.command()
@click.option(
    "--only",
    multiple=True,
    help="Run only these benchmarks (prepare, train, evaluate, serve, serve-live; accuracy: a full "
    "Diginetica training, only when named).",
)
@click.option("--quick", is_flag=True, help="Smaller sizes, for a smoke run.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where train and accuracy run (on a GPU only those two run).",
)
@friendly_errors
def bench(only: tuple[str, ...], quick: bool, device: str) -> None:
    """Benchmarks: events/s, latency percentiles and peak memory."""
    from benchmarks.runner import run_benchmarks

    run_benchmarks(list(only), quick=quick, device=device)


@main.command()
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=5000, show_default=True)
@friendly_errors
def ui(port: int) -> None:
    """MLflow UI on 127.0.0.1:PORT for the project's store (or MLFLOW_TRACKING_URI's)."""
    import os

    from pipelines.serve import server_env
    from recsys.core.errors import RecsysError
    from recsys.serving.mlflow_store import tracking_uri

    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "ui", "--backend-store-uri", tracking_uri(), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    if not Path(mlflow).is_file():
        raise RecsysError(f"{mlflow}: mlflow is not installed in this environment")
    click.echo(
        f"MLflow UI on http://127.0.0.1:{port}; recsys runs are in its Model training view "
        f"(the switch atop the side bar; `recsys pipeline` prints its experiment's link)",
        err=True,
    )
    os.execve(command[0], command, server_env(os.environ))


# recsys serve-live and recsys export: pipelines/cli_live.py (it keeps this module small)
register_live_commands(main, friendly_errors)
register_cells_command(main, friendly_errors)  # recsys compare-cells: pipelines/cli_cells.py
register_replay_command(main, friendly_errors)  # recsys replay: pipelines/cli_replay.py

if __name__ == "__main__":
    main()
