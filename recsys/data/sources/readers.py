"""Readers of public click-log formats, one per format, each mapped onto canonical events.

Canonical events have three columns: ``session_id``, ``item_id`` (integer or string ids as
found in the log) and ``timestamp`` (UTC, ms). The SR-GNN preprocessed logs also carry a
``split`` column, because their train/test split is given and they have no timestamps.

Formats with their own session ids are read file by file (``read_*``). Formats without them
are parsed file by file into user streams (``parse_*``) that ``sessionise`` cuts together.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.config import SourceConfig
from recsys.core.errors import RecsysError, first_line
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME, TIME_DTYPE
from recsys.data.sources.parsing import (
    ERROR_LINE_LIMIT,
    Parse,
    as_date,
    as_datetime,
    as_epoch,
    as_int,
    as_text,
    canonical,
    check_file,
    header_line,
    id_column,
    plausible_times,
    read_delimited,
    scan_strings,
    strict_cast,
)
from recsys.data.sources.sessionise import KEEP, USER

# --- readers of formats with their own session ids -----------------------------------------


def read_yoochoose(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """RSC15 ``yoochoose-clicks.dat``: no header, ``SessionId,Timestamp,ItemId,Category``."""
    check_file(path)
    first = header_line(path)
    if first.count(",") < 3:
        raise RecsysError(
            f"{path}: expected comma-separated rows SessionId,Timestamp,ItemId,Category without a "
            f"header, found {first[:80]!r}"
        )
    raw = scan_strings(
        path, ",", has_header=False, names=["SessionId", "Timestamp", "ItemId", "Category"]
    )
    parses = {
        SESSION: as_int("SessionId", "an integer session id"),
        ITEM: as_int("ItemId", "an integer item id"),
        TIME: as_datetime(
            "Timestamp",
            "an ISO-8601 UTC time such as 2014-04-07T10:51:09.277Z",
            "%Y-%m-%dT%H:%M:%S%.fZ",
        ),
    }
    return canonical(strict_cast(raw, path, parses, separator=",", line_offset=1))


def read_gru4rec_tsv(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """The GRU4Rec / session-rec TSV: header ``SessionId ItemId Time`` (epoch seconds)."""
    check_file(path)
    parses = {
        SESSION: as_int("SessionId", "an integer session id"),
        ITEM: as_int("ItemId", "an integer item id"),
        TIME: as_epoch("Time", "s", "a number of epoch seconds"),
    }
    sep = config.separator or "\t"
    return canonical(read_delimited(path, sep, ["SessionId", "ItemId", "Time"], parses))


def read_diginetica(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Diginetica ``train-item-views.csv``: time = the session's first eventdate + timeframe ms."""
    check_file(path)
    camel = "sessionId" in header_line(path)
    s, i = ("sessionId", "itemId") if camel else ("session_id", "item_id")
    parses = {
        SESSION: as_int(s, "an integer session id"),
        ITEM: as_int(i, "an integer item id"),
        "timeframe": as_int("timeframe", "an integer number of milliseconds"),
        "eventdate": as_date("eventdate", "a date YYYY-MM-DD"),
    }
    sep = config.separator or ";"
    parsed = read_delimited(path, sep, [s, i, "timeframe", "eventdate"], parses)
    day0 = (
        pl.col("eventdate").min().over(SESSION).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    )
    time = day0 + pl.duration(milliseconds=pl.col("timeframe"))
    return canonical(parsed.lazy().with_columns(time.alias(TIME)))


def read_srgnn_tsv(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """SR-GNN-style preprocessed sessions ``session_id position item_id split`` (no timestamps).

    The given split and order are kept. Times are synthesised from file order (one second per
    session, one millisecond per position) only so that sorting is well defined; stats say so.
    """
    check_file(path)
    parses = {
        SESSION: as_int(SESSION, "an integer session id"),
        "position": as_int("position", "an integer position"),
        ITEM: as_int(ITEM, "an integer item id"),
        SPLIT: as_text(SPLIT, "'train' or 'test'"),
    }
    sep = config.separator or "\t"
    parsed = read_delimited(path, sep, [SESSION, "position", ITEM, SPLIT], parses)
    bad = parsed.with_row_index("__row").filter(
        ~pl.col(SPLIT).is_in(["train", "test"]).fill_null(False) | (pl.col("position") < 0)
    )
    if bad.height:
        line = int(bad["__row"][0]) + 2
        if bad["position"][0] is not None and bad["position"][0] < 0:
            raise RecsysError(
                f"{path}: column 'position': expected a position >= 0, found "
                f"{bad['position'][0]} on line {line}"
            )
        raise RecsysError(
            f"{path}: column 'split': expected 'train' or 'test', found {bad[SPLIT][0]!r} "
            f"on line {line}"
        )
    order = pl.col(SESSION).rank("dense").cast(pl.Int64)
    ts = (order * 1000 + pl.col("position")).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    return canonical(parsed.lazy().with_columns(ts.alias(TIME)))


def read_table(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Any CSV/TSV/Parquet with a column mapping (canonical name -> file column) in the config.

    Integer-looking ids become integers (compact, fast); anything else stays text.
    """
    check_file(path)
    mapping = config.columns or {}
    missing_keys = [k for k in (SESSION, ITEM, TIME) if k not in mapping]
    if missing_keys:
        raise RecsysError(f"config data.source.columns: missing a mapping for {missing_keys}")
    unit = config.timestamp_unit
    if path.suffix.lower() in (".parquet", ".pq"):
        return canonical(plausible_times(_read_parquet_table(path, mapping, unit), path, config))
    if unit == "datetime":
        time = as_datetime(mapping[TIME], "a date-time string such as 2024-01-31T12:00:00")
    else:
        time = as_epoch(mapping[TIME], unit, f"a number of epoch {unit}")
    parses = {
        SESSION: as_text(mapping[SESSION], "a session id"),
        ITEM: as_text(mapping[ITEM], "an item id"),
        TIME: time,
    }
    sep = config.separator or ("\t" if path.suffix.lower() in (".tsv", ".txt", ".dat") else ",")
    parsed = read_delimited(path, sep, list(dict.fromkeys(mapping.values())), parses)
    parsed = parsed.with_columns(id_column(parsed[ITEM]), id_column(parsed[SESSION]))
    return canonical(plausible_times(parsed, path, config))


def _read_parquet_table(path: Path, mapping: dict[str, str], unit: str) -> pl.DataFrame:
    try:
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        cause = first_line(exc, limit=ERROR_LINE_LIMIT)
        raise RecsysError(f"{path}: not a readable Parquet file: {cause}") from None
    missing = [c for c in dict.fromkeys(mapping.values()) if c not in schema.names()]
    if missing:
        raise RecsysError(f"{path}: missing column(s) {missing}; found {schema.names()}")
    col = mapping[TIME]
    dtype = schema[col]
    if dtype == pl.String:
        time = as_datetime(col, "a date-time string such as 2024-01-31T12:00:00")
    elif dtype.is_numeric():
        if unit == "datetime":
            raise RecsysError(
                f"{path}: column {col!r} holds numbers ({dtype}), but data.source.timestamp_unit "
                f"is 'datetime'; set it to the epoch unit: s, ms, us or ns"
            )
        time = as_epoch(col, unit, f"a number of epoch {unit}")
    elif isinstance(dtype, pl.Datetime):
        as_utc = (
            pl.col(col).dt.replace_time_zone("UTC")
            if dtype.time_zone is None
            else pl.col(col).dt.convert_time_zone("UTC")
        )
        as_utc = as_utc.cast(TIME_DTYPE)
        time = Parse(col, as_utc, as_utc, "a time")
    elif dtype == pl.Date:
        as_utc = pl.col(col).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
        time = Parse(col, as_utc, as_utc, "a date")
    else:
        raise RecsysError(f"{path}: column {col!r}: expected a time, found type {dtype}")
    ids = {
        SESSION: pl.col(mapping[SESSION]),
        ITEM: pl.col(mapping[ITEM]),
    }
    for name, expr in ids.items():
        dtype = schema[mapping[name]]
        if not (dtype.is_integer() or dtype.is_float() or dtype == pl.String):
            ids[name] = expr.cast(pl.String)
    parses = {k: Parse(mapping[k], e, e, "an id") for k, e in ids.items()}
    parses[TIME] = time
    parsed = strict_cast(lf, path, parses)
    return parsed.with_columns(id_column(parsed[k]) for k in (SESSION, ITEM))


# --- formats without sessions (or with over-long ones): user streams, cut by sessionise ------


def parse_retailrocket(path: Path, config: SourceConfig) -> pl.DataFrame:
    """RetailRocket ``events.csv``: every event (a view or not) counts for sessionising."""
    check_file(path)
    view = pl.col("event") == "view"
    parses = {
        USER: as_int("visitorid", "an integer visitor id"),
        ITEM: as_int("itemid", "an integer item id"),
        TIME: as_epoch("timestamp", "ms", "epoch milliseconds"),
        KEEP: Parse("event", view, view, "an event"),
    }
    required = ["timestamp", "visitorid", "event", "itemid"]
    return read_delimited(path, config.separator or ",", required, parses)


def parse_rees46(path: Path, config: SourceConfig) -> pl.DataFrame:
    """Rees46 monthly CSVs: views only (other event types never parsed)."""
    check_file(path)
    parses = {
        USER: as_int("user_id", "an integer user id"),
        ITEM: as_int("product_id", "an integer product id"),
        TIME: as_datetime(
            "event_time", "a time such as '2019-10-01 00:00:00 UTC'", "%Y-%m-%d %H:%M:%S UTC"
        ),
    }
    required = ["event_time", "event_type", "product_id", "user_id"]
    views = pl.col("event_type") == "view"
    return read_delimited(path, config.separator or ",", required, parses, where=views)


def parse_coveo(path: Path, config: SourceConfig) -> pl.DataFrame:
    """Coveo ``browsing_train.csv``: product detail views within the given session hashes, which
    sessionising splits again at long gaps."""
    check_file(path)
    parses = {
        USER: as_text("session_id_hash", "a session hash"),
        ITEM: as_text("product_sku_hash", "a product hash"),
        TIME: as_epoch("server_timestamp_epoch_ms", "ms", "epoch milliseconds"),
    }
    required = [
        "session_id_hash",
        "product_action",
        "product_sku_hash",
        "server_timestamp_epoch_ms",
    ]
    details = (pl.col("product_action") == "detail") & pl.col("product_sku_hash").is_not_null()
    return read_delimited(path, config.separator or ",", required, parses, where=details)
