"""The ``recsys compare-cells`` command, registered on the ``recsys`` group (``pipelines/cli.py``
stays small); its errors are one line and exit code 1, as everywhere."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli_options import Guard, config_option


def register(group: click.Group, guard: Guard) -> None:
    """Add ``compare-cells`` to ``group``; ``guard`` is the CLI's error decorator."""

    @group.command("compare-cells")
    @config_option("Run configuration (YAML): the settings every variant shares.")
    @click.option("--force", is_flag=True, help="Train and evaluate every variant again.")
    @guard
    def compare_cells(config_path: Path, force: bool) -> None:
        """Every cell (and BPTT 1 vs 5 for gru/lstm) trained and evaluated in one harness,
        compared in an MLflow parent run (docs/cells.md)."""
        from pipelines.compare_cells import run_compare_cells
        from pipelines.prepare import run_prepare
        from pipelines.tracking import Tracker
        from recsys.config import load_config

        config = load_config(config_path)
        tracker = Tracker(config)
        tracker.client  # noqa: B018 - an unreachable store is said before the training
        run_prepare(config, None)  # the prepared data, made or found up to date
        run_compare_cells(config, tracker, force=force)
