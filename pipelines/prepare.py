"""The prepare step: raw click log -> prepared dataset, logged to MLflow."""

from __future__ import annotations

from typing import Any

from pipelines.report import format_table
from pipelines.tracking import TAG_CACHED, TAG_DATA, Tracker
from recsys.config import Config
from recsys.core.progress import step
from recsys.data.preparation import prepare
from recsys.data.schema import STATS_FILE, TEST, TRAIN, TRAIN_TR, VALID


def run_prepare(config: Config, tracker: Tracker | None, force: bool = False) -> dict[str, Any]:
    with step(f"prepare [{config.name}]"):
        stats, redone = prepare(config, force=force)
    if tracker is not None:
        with tracker.step("prepare", ("data",)) as run:
            run.tags({TAG_DATA: stats["fingerprint"], TAG_CACHED: str(not redone).lower()})
            run.metrics(
                {
                    f"{split}.{key}": stats["splits"][split][key]
                    for split in (TRAIN, TEST, TRAIN_TR, VALID)
                    for key in ("events", "sessions", "items")
                }
                | {"test_predictions": stats["test_predictions"], "items": stats["items"]}
            )
            run.artifact(config.prepared_dir / STATS_FILE)
    print(stats_table(stats, cached=not redone))
    return stats


def stats_table(stats: dict[str, Any], cached: bool = False) -> str:
    rows = [
        {
            "split": name,
            "events": s["events"],
            "sessions": s["sessions"],
            "items": s["items"],
            "median len": s.get("session_length", {}).get("median", 0.0),
        }
        for name, s in stats["splits"].items()
    ]
    dropped = stats["dropped"]
    note = (
        f"dropped: {dropped['missing_values']:,} rows with missing values, "
        f"{dropped['consecutive_repeats']:,} consecutive repeats, "
        f"{dropped['short_sessions']:,} in short sessions, {dropped['rare_items']:,} of rare items, "
        f"{dropped.get('test_unknown_items', 0):,} test clicks on unknown items"
    )
    head = "prepared dataset" + (" (up to date, not redone)" if cached else "")
    return "\n".join(
        [
            head,
            format_table(rows, ["split", "events", "sessions", "items", "median len"]),
            f"catalogue: {stats['items']:,} items; test predictions: {stats['test_predictions']:,}",
            note,
        ]
    )
