"""The ``recsys serve-live`` and ``recsys export`` commands, registered on the ``recsys`` group.

Kept apart from ``pipelines/cli.py`` (which stays small) and registered by it with its error
guard, so these commands report a ``RecsysError`` as one line and an exit code 1 like the rest.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli_options import Guard, config_option


def register(group: click.Group, guard: Guard) -> None:
    """Add the commands to ``group``; ``guard`` is the CLI's error decorator."""
    group.add_command(_serve_live(guard))
    group.add_command(_export(guard))


def _serve_live(guard: Guard) -> click.Command:
    @click.command("serve-live")
    @config_option("Serve the model registered for this config, following --alias.")
    @click.option(
        "--model",
        "-m",
        "model_uri",
        help="Or this model: models:/name@alias (followed), models:/name/N, a file or directory.",
    )
    @click.option("--alias", default="champion", show_default=True, help="Alias to follow (-c).")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
    @click.option("--port", "-p", type=click.IntRange(1, 65535), default=5056, show_default=True)
    @click.option(
        "--capacity", type=click.IntRange(min=1), default=100_000, show_default=True,
        help="Most sessions held; the least recently clicked goes first.",
    )  # fmt: skip
    @click.option(
        "--ttl", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True,
        help="Seconds a session may stay idle before it is forgotten.",
    )  # fmt: skip
    @click.option(
        "--keep-clicks", type=click.IntRange(min=1), default=200, show_default=True,
        help="Clicks kept per session (replayed into a new model; exclude_seen sees these).",
    )  # fmt: skip
    @click.option(
        "--poll", type=click.FloatRange(min=0), default=30.0, show_default=True,
        help="Seconds between registry checks of the alias (0: only POST /admin/reload).",
    )  # fmt: skip
    @click.option(
        "--batch-window-ms", type=click.FloatRange(0, 50), default=0.0, show_default=True,
        help="How long the micro-batcher waits for more requests after the first (0: it "
        "gathers only those already queued; measured best for latency here).",
    )  # fmt: skip
    @click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True)
    @click.option(
        "--max-body-bytes", type=click.IntRange(min=1), default=1_000_000, show_default=True
    )
    @click.option("--max-k", type=click.IntRange(min=1), default=1000, show_default=True)
    @guard
    def serve_live(
        config_path: Path,
        model_uri: str | None,
        alias: str,
        host: str,
        port: int,
        capacity: int,
        ttl: float,
        keep_clicks: int,
        poll: float,
        batch_window_ms: float,
        max_batch: int,
        max_body_bytes: int,
        max_k: int,
    ) -> None:
        """Live REST service: one GRU step per click, sessions kept, model roll-over.

        POST /sessions/ID/clicks, GET /sessions/ID/recommendations, DELETE /sessions/ID,
        POST /invocations (as mlflow models serve), GET /health, GET /metrics; docs/serving.md.
        """
        from pipelines.serve_live import LiveOptions, run_live
        from recsys.config import load_config

        if model_uri is None:
            model_uri = f"models:/{load_config(config_path).registered_model_name}@{alias}"
        options = LiveOptions(
            host, port, capacity, ttl, keep_clicks, poll, batch_window_ms, max_batch,
            max_body_bytes, max_k,
        )  # fmt: skip
        run_live(model_uri, options)

    return serve_live


def _export(guard: Guard) -> click.Command:
    @click.command("export")
    @click.option(
        "--model", "-m", "model_uri", required=True, help="Model file/dir or models:/name@alias."
    )
    @click.option(
        "--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx",
        show_default=True,
    )  # fmt: skip
    @click.option(
        "--output", "-o", "output", required=True,
        type=click.Path(path_type=Path, file_okay=False), help="Directory to write.",
    )  # fmt: skip
    @guard
    def export(model_uri: str, fmt: str, output: Path) -> None:
        """The scoring step (item + state -> new state + scores) for use outside Python."""
        from recsys.serving.export import export_model
        from recsys.serving.recommender import SessionRecommender

        rec = SessionRecommender.load(model_uri, threads=1)
        written = export_model(rec, fmt, output)
        click.echo(f"wrote {fmt} scoring step to {written} (see docs/serving.md#export)")

    return export
