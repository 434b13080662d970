"""When a step is redone: one key over everything its output depends on, kept in its marker.

Each step writes a JSON marker last (prepared ``stats.json``, model ``meta.json``, evaluation
``metrics.json``) that holds the key of its inputs: the config sections it reads, the
fingerprints of the outputs it consumes and, for preparation, the raw input's identity. A rerun
whose key matches redoes nothing; a change to any input changes the key and redoes the step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recsys.config import Config
from recsys.core.fingerprint import digest

KEY = "key"  # the marker's field that holds the step key


def step_key(*parts: str) -> str:
    """16 hex digits of SHA-256 over the parts: short, stable, changed by any part."""
    return digest(["|".join(parts).encode()])


def config_key(config: Config, *sections: str) -> str:
    """The identity of the config sections a step reads (also MLflow's config tag of the step)."""
    dumped = config.model_dump(mode="json")
    return step_key(json.dumps({s: dumped[s] for s in sections}, sort_keys=True, default=str))


def read_marker(
    path: Path, key: str | None = None, needs: Iterable[Path] = (), field: str = KEY
) -> dict[str, Any] | None:
    """A step's marker, or None when the step must be redone: the marker is missing or not
    readable JSON, one of the outputs it describes (``needs``) is gone, or (given ``key``) it
    was written for other inputs."""
    if not path.exists() or not all(p.exists() for p in needs):
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(marker, dict) or (key is not None and marker.get(field) != key):
        return None
    return marker
