"""What every ``recsys`` command module shares: the ``--config`` option and the guard's type.
The commands live in several modules (``pipelines/cli.py`` stays small), so these have one home
that none of them imports the others for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

Guard = Callable[[Callable[..., Any]], Callable[..., Any]]  # the CLI's one-line-error decorator


def config_option(help: str = "Run configuration (YAML).") -> Callable[[Any], Any]:
    """``--config/-c CONFIG``, the embedded default unless given; ``help`` says what it is for."""
    return click.option(
        "--config",
        "-c",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=Path("configs/default.yaml"),
        show_default=True,
        help=help,
    )
