"""The ``recsys replay`` command, registered on the ``recsys`` group (``pipelines/cli.py`` stays
small); its errors are one line and exit code 1, as everywhere."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli_options import Guard, config_option


def register(group: click.Group, guard: Guard) -> None:
    """Add ``replay`` to ``group``; ``guard`` is the CLI's error decorator."""

    @group.command("replay")
    @config_option("Run configuration (YAML); its log needs timestamps.")
    @click.option(
        "--days", type=click.IntRange(min=1), default=7, show_default=True, help="Days to replay."
    )
    @click.option(
        "--cold-every",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Also retrain cold every K days (1: every day), for the comparison.",
    )
    @click.option(
        "--warm-epochs",
        type=click.IntRange(min=1),
        help="Epochs of each daily warm update (default: train.epochs, as a cold retrain).",
    )
    @guard
    def replay(config_path: Path, days: int, cold_every: int, warm_epochs: int | None) -> None:
        """Daily retraining replayed: warm updates vs cold retrains, day by day (docs/retraining.md)."""
        from pipelines.replay import run_replay
        from pipelines.tracking import Tracker
        from recsys.config import load_config

        config = load_config(config_path)
        tracker = Tracker(config)
        tracker.client  # noqa: B018 - an unreachable store is said before the training
        run_replay(config, tracker, days, cold_every, warm_epochs)
