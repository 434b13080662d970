"""Batch scoring of a Parquet file of sessions into a Parquet file of top-k recommendations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys.atomic import atomic_path
from recsys.data.schema import ITEM, SESSION
from recsys.errors import RecsysError
from recsys.progress import Progress
from recsys.serving import SessionRecommender

ITEMS = "items"


def read_sessions(path: Path) -> pl.DataFrame:
    """``session_id`` + ``items`` (list) as is, or ``session_id`` + ``item_id`` rows in click order."""
    if not path.is_file():
        raise RecsysError(f"{path}: input file not found")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise RecsysError(f"{path}: not a readable Parquet file ({exc})") from None
    cols = frame.columns
    if SESSION in cols and ITEMS in cols:
        if not isinstance(frame.schema[ITEMS], pl.List):
            raise RecsysError(
                f"{path}: column '{ITEMS}' must be a list of item ids, found {frame.schema[ITEMS]}"
            )
        return frame.select(SESSION, ITEMS)
    if SESSION in cols and ITEM in cols:
        return frame.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM).alias(ITEMS))
    raise RecsysError(
        f"{path}: expected columns ({SESSION}, {ITEMS}) or ({SESSION}, {ITEM}); found {cols}"
    )


def score_file(
    recommender: SessionRecommender,
    input_path: Path,
    output_path: Path,
    k: int = 20,
    batch_size: int = 256,
    exclude_seen: bool = False,
) -> dict[str, Any]:
    """Write one row per session (rank-ordered ``items`` and ``scores`` lists) atomically."""
    sessions = read_sessions(input_path)
    out_items: list[list[Any]] = []
    out_scores: list[list[float]] = []
    unknown: list[list[Any]] = []
    fallback: list[bool] = []
    bar = Progress(sessions.height, "score", unit="sessions")
    lists = sessions[ITEMS].to_list()
    for start in range(0, len(lists), batch_size):
        batch = [s or [] for s in lists[start : start + batch_size]]
        for rec in recommender.recommend_batch(batch, k, exclude_seen):
            out_items.append(rec.items)
            out_scores.append(rec.scores)
            unknown.append([str(u) for u in rec.unknown])
            fallback.append(rec.fallback is not None)
        bar.update(len(batch))
    bar.close()
    result = sessions.select(SESSION).with_columns(
        pl.Series("items", out_items),
        pl.Series("scores", out_scores, dtype=pl.List(pl.Float32)),
        pl.Series("unknown_items", unknown, dtype=pl.List(pl.String)),
        pl.Series("fallback_popular", fallback, dtype=pl.Boolean),
    )
    with atomic_path(output_path) as tmp:
        result.write_parquet(tmp)
    return {
        "sessions": result.height,
        "unknown": sum(len(u) for u in unknown),
        "fallback": sum(fallback),
    }
