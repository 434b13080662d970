"""Batch scoring of a Parquet file of sessions into a Parquet file of top-k recommendations.

Input: ``session_id`` + ``items`` (a list of item ids per session), read in slices so a large
file is never held twice; or ``session_id`` + ``item_id`` rows in click order (grouped in
memory, since a time-ordered log interleaves its sessions). Output: one row per session with
the ranked ``items``, their ``scores``, the ``unknown_items`` that were skipped and whether the
popularity fallback answered. The output appears complete or not at all: it is written to a
temporary sibling that replaces the target only after every session was scored, so a failure
midway (a damaged input, a full disk, Ctrl-C) leaves any previous output untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from recsys.core.atomic import atomic_path
from recsys.core.errors import RecsysError, first_line
from recsys.core.progress import Progress
from recsys.data.schema import ITEM, SESSION
from recsys.serving.recommender import SessionRecommender

ITEMS = "items"
SCORES = "scores"
UNKNOWN = "unknown_items"
FALLBACK = "fallback_popular"
READ_BATCHES = 64  # a list-form input is read in slices of this many scoring batches
_ID_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def _schema(path: Path) -> pl.Schema:
    if not path.is_file():
        raise RecsysError(f"{path}: input file not found")
    try:
        return pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise RecsysError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None


def _check_id_type(path: Path, column: str, dtype: Any) -> None:
    if not (dtype in _ID_TYPES or dtype == pl.String or dtype == pl.Null):
        raise RecsysError(
            f"{path}: column '{column}' must hold integer or string item ids, found {dtype}"
        )


def input_layout(path: Path) -> str:
    """``"lists"`` or ``"rows"``; a clear error for any other file."""
    schema = _schema(path)
    cols = list(schema)
    if SESSION in cols and ITEMS in cols:
        dtype = schema[ITEMS]
        if not isinstance(dtype, pl.List):
            raise RecsysError(
                f"{path}: column '{ITEMS}' must be a list of item ids per session, found {dtype}"
            )
        _check_id_type(path, f"{ITEMS}[]", dtype.inner)
        return "lists"
    if SESSION in cols and ITEM in cols:
        _check_id_type(path, ITEM, schema[ITEM])
        return "rows"
    raise RecsysError(
        f"{path}: expected columns ({SESSION}, {ITEMS}) or ({SESSION}, {ITEM}); found {cols}"
    )


def read_sessions(path: Path, chunk_rows: int) -> tuple[int, Iterator[pl.DataFrame]]:
    """The number of sessions and frames of (``session_id``, ``items``) in input order.

    A list-form input is read ``chunk_rows`` sessions at a time, so memory stays bounded by
    the slice plus the (much smaller) top-k output.
    """
    layout = input_layout(path)
    try:
        if layout == "rows":
            frame = (
                pl.read_parquet(path, columns=[SESSION, ITEM])
                .group_by(SESSION, maintain_order=True)
                .agg(pl.col(ITEM).alias(ITEMS))
            )
            return frame.height, iter([frame])
        total = pl.scan_parquet(path).select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise RecsysError(f"{path}: could not read the sessions ({first_line(exc)})") from None

    def slices() -> Iterator[pl.DataFrame]:
        for offset in range(0, total, chunk_rows):
            # A sliced scan reads only the row groups it needs.
            yield pl.scan_parquet(path).select(SESSION, ITEMS).slice(offset, chunk_rows).collect()

    return total, slices()


def score_file(
    recommender: SessionRecommender,
    input_path: Path,
    output_path: Path,
    k: int = 20,
    batch_size: int = 256,
    exclude_seen: bool = False,
) -> dict[str, Any]:
    """Write one row per session (rank-ordered ``items`` and ``scores`` lists) atomically."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise RecsysError(f"{output_path}: the output would overwrite the input")
    start = time.perf_counter()
    total, frames = read_sessions(input_path, batch_size * READ_BATCHES)
    session_ids: list[pl.Series] = []
    out_items: list[list[Any]] = []
    out_scores: list[list[float]] = []
    unknown: list[list[str]] = []
    fallback: list[bool] = []
    try:
        # Open the temporary output first: an unwritable destination fails before the work.
        with atomic_path(output_path) as tmp:
            bar = Progress(total, "score", unit="sessions")
            done = 0
            try:
                for frame in frames:
                    session_ids.append(frame[SESSION])
                    lists = frame[ITEMS].to_list()
                    for at in range(0, len(lists), batch_size):
                        batch = [s or [] for s in lists[at : at + batch_size]]
                        for rec in recommender.recommend_batch(batch, k, exclude_seen):
                            out_items.append(rec.items)
                            out_scores.append(rec.scores)
                            unknown.append([str(u) for u in rec.unknown])
                            fallback.append(rec.fallback is not None)
                        done += len(batch)
                        bar.update(len(batch))
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise RecsysError(
                    f"{input_path}: reading failed after {done:,} of {total:,} sessions "
                    f"({first_line(exc)}); no output was written"
                ) from None
            finally:
                bar.close()
            result = _result_frame(
                recommender, session_ids, out_items, out_scores, unknown, fallback
            )
            result.write_parquet(tmp)
    except OSError as exc:
        raise RecsysError(f"{output_path}: cannot write the output ({first_line(exc)})") from None
    return {
        "sessions": len(out_items),
        "unknown": sum(len(u) for u in unknown),
        "fallback": sum(fallback),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _result_frame(
    recommender: SessionRecommender,
    session_ids: list[pl.Series],
    items: list[list[Any]],
    scores: list[list[float]],
    unknown: list[list[str]],
    fallback: list[bool],
) -> pl.DataFrame:
    ids = pl.concat(session_ids) if session_ids else pl.Series(SESSION, [], dtype=pl.Int64)
    id_type = pl.Int64 if recommender.numeric_ids else pl.String
    return pl.DataFrame(
        [
            ids.alias(SESSION),
            pl.Series(ITEMS, items, dtype=pl.List(id_type)),
            pl.Series(SCORES, scores, dtype=pl.List(pl.Float32)),
            pl.Series(UNKNOWN, unknown, dtype=pl.List(pl.String)),
            pl.Series(FALLBACK, fallback, dtype=pl.Boolean),
        ]
    )
