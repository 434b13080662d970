"""Readers of public click-log formats, each mapped onto canonical events.

Canonical events have three columns: ``session_id``, ``item_id`` (integer or string ids as
found in the log) and ``timestamp`` (UTC, ms). The SR-GNN preprocessed logs also carry a
``split`` column, because their train/test split is given and they have no timestamps.
Every reader is lazy; a problem with the file is raised as a ``RecsysError`` naming the file,
the column or row, and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.config import SourceConfig
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME, TIME_DTYPE
from recsys.data.synthetic import generate_clicks
from recsys.errors import RecsysError

_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RecsysError(f"{path}: file not found")
    if not path.is_file():
        raise RecsysError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise RecsysError(f"{path}: file is empty")


def _header(path: Path) -> str:
    with path.open("rb") as fh:
        line = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    if not line.strip():
        raise RecsysError(f"{path}: file is empty (no header line)")
    return line


def _check_columns(path: Path, separator: str, required: list[str]) -> list[str]:
    """Validate the header: the columns exist, and the separator is the right one."""
    header = _header(path)
    columns = [c.strip().strip('"') for c in header.split(separator)]
    missing = [c for c in required if c not in columns]
    if not missing:
        return columns
    sep_name = _SEPARATORS.get(separator, repr(separator))
    if len(columns) == 1:
        others = [name for s, name in _SEPARATORS.items() if s != separator and s in header]
        hint = f"; the header looks {others[0]}-separated" if others else ""
        raise RecsysError(
            f"{path}: expected {sep_name}-separated columns {required}, found a single column "
            f"{header[:80]!r}{hint} (wrong delimiter?)"
        )
    raise RecsysError(
        f"{path}: missing column(s) {missing}; expected {required} ({sep_name}-separated), "
        f"found {columns}"
    )


@dataclass(frozen=True)
class _Parse:
    """How one output column is parsed from a text column, strictly and leniently.

    The strict form is the fast path; the lenient form (failures -> null) only runs after a
    failure, to find the first bad row for the error message.
    """

    column: str
    strict: pl.Expr
    lenient: pl.Expr
    expected: str


def _int(col: str, expected: str) -> _Parse:
    return _Parse(col, pl.col(col).cast(pl.Int64, strict=True), pl.col(col).cast(pl.Int64, strict=False), expected)


def _text(col: str, expected: str) -> _Parse:
    return _Parse(col, pl.col(col).cast(pl.String), pl.col(col).cast(pl.String), expected)


def _epoch_expr(number: pl.Expr, unit: str) -> pl.Expr:
    factor = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}[unit]
    return (number * factor).round(0).cast(pl.Int64).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")


def _epoch(col: str, unit: str, expected: str) -> _Parse:
    """Numeric epoch time in ``unit`` -> UTC ms datetime."""
    return _Parse(
        col,
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=True), unit),
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=False), unit),
        expected,
    )


def _datetime(col: str, expected: str, fmt: str | None = None, strip: str | None = None) -> _Parse:
    def parse(strict: bool) -> pl.Expr:
        text = pl.col(col)
        if strip:
            text = text.str.replace(strip, "")
        return text.str.to_datetime(fmt, strict=strict, time_zone="UTC").dt.cast_time_unit("ms")

    return _Parse(col, parse(True), parse(False), expected)


def _date(col: str, expected: str) -> _Parse:
    return _Parse(
        col,
        pl.col(col).str.to_date("%Y-%m-%d", strict=True),
        pl.col(col).str.to_date("%Y-%m-%d", strict=False),
        expected,
    )


def _strict_cast(
    frame: pl.LazyFrame,
    path: Path,
    parses: dict[str, _Parse],
    line_offset: int = 2,
) -> pl.DataFrame:
    """Parse text columns strictly; on failure name the column and the first bad line."""
    out = frame.with_columns(**{name: p.strict for name, p in parses.items()})
    try:
        return out.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        numbered = frame.with_row_index("__row")
        for p in parses.values():
            bad = (
                numbered.filter(pl.col(p.column).is_not_null() & p.lenient.is_null())
                .select("__row", pl.col(p.column))
                .head(1)
                .collect()
            )
            if bad.height:
                line = int(bad["__row"][0]) + line_offset
                raise RecsysError(
                    f"{path}: column {p.column!r}: expected {p.expected}, found "
                    f"{bad[p.column][0]!r} on line {line}"
                ) from None
        raise RecsysError(f"{path}: could not parse the file: {first}") from None


def _scan_strings(
    path: Path, separator: str, has_header: bool = True, names: list[str] | None = None
) -> pl.LazyFrame:
    return pl.scan_csv(
        path, separator=separator, has_header=has_header, new_columns=names, infer_schema=False
    )


def _sessionise(frame: pl.LazyFrame, user: str, gap_minutes: float) -> pl.LazyFrame:
    """Cut each user's event stream into sessions at inactivity gaps longer than ``gap_minutes``."""
    gap = pl.duration(milliseconds=int(gap_minutes * 60_000))
    return (
        frame.sort([user, TIME], maintain_order=True)
        .with_columns(
            (
                (pl.col(user) != pl.col(user).shift(1))
                | ((pl.col(TIME) - pl.col(TIME).shift(1)) > gap)
            )
            .fill_null(True)
            .cum_sum()
            .cast(pl.Int64)
            .alias(SESSION)
        )
    )


def _canonical(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    lf = frame.lazy()
    cols = [SESSION, ITEM, TIME]
    if SPLIT in lf.collect_schema().names():
        cols.append(SPLIT)
    return lf.select(cols)


# --- readers --------------------------------------------------------------------------------


def read_yoochoose(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """RSC15 ``yoochoose-clicks.dat``: no header, ``SessionId,Timestamp,ItemId,Category``."""
    _check_file(path)
    first = _header(path)
    if first.count(",") < 3:
        raise RecsysError(
            f"{path}: expected comma-separated rows SessionId,Timestamp,ItemId,Category without a "
            f"header, found {first[:80]!r}"
        )
    raw = _scan_strings(
        path, ",", has_header=False, names=["SessionId", "Timestamp", "ItemId", "Category"]
    )
    parses = {
        SESSION: _int("SessionId", "an integer session id"),
        ITEM: _int("ItemId", "an integer item id"),
        TIME: _datetime("Timestamp", "an ISO-8601 time such as 2014-04-07T10:51:09.277Z"),
    }
    return _canonical(_strict_cast(raw, path, parses, line_offset=1))


def read_gru4rec_tsv(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """The GRU4Rec / session-rec TSV: header ``SessionId ItemId Time`` (epoch seconds)."""
    _check_file(path)
    sep = config.separator or "\t"
    _check_columns(path, sep, ["SessionId", "ItemId", "Time"])
    parses = {
        SESSION: _int("SessionId", "an integer session id"),
        ITEM: _int("ItemId", "an integer item id"),
        TIME: _epoch("Time", "s", "a number of epoch seconds"),
    }
    return _canonical(_strict_cast(_scan_strings(path, sep), path, parses))


def read_diginetica(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Diginetica ``train-item-views.csv``: time = the session's first eventdate + timeframe ms."""
    _check_file(path)
    sep = config.separator or ";"
    camel = "sessionId" in _header(path)
    s, i = ("sessionId", "itemId") if camel else ("session_id", "item_id")
    _check_columns(path, sep, [s, i, "timeframe", "eventdate"])
    parses = {
        SESSION: _int(s, "an integer session id"),
        ITEM: _int(i, "an integer item id"),
        "timeframe": _int("timeframe", "an integer number of milliseconds"),
        "eventdate": _date("eventdate", "a date YYYY-MM-DD"),
    }
    parsed = _strict_cast(_scan_strings(path, sep), path, parses)
    day0 = (
        pl.col("eventdate").min().over(SESSION).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    )
    time = day0 + pl.duration(milliseconds=pl.col("timeframe"))
    return _canonical(parsed.lazy().with_columns(time.alias(TIME)))


def read_retailrocket(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """RetailRocket ``events.csv``: sessionised per visitor on all events, then views kept."""
    _check_file(path)
    sep = config.separator or ","
    _check_columns(path, sep, ["timestamp", "visitorid", "event", "itemid"])
    parses = {
        "visitorid": _int("visitorid", "an integer visitor id"),
        ITEM: _int("itemid", "an integer item id"),
        TIME: _epoch("timestamp", "ms", "epoch milliseconds"),
    }
    parsed = _strict_cast(_scan_strings(path, sep), path, parses)
    sessions = _sessionise(parsed.lazy(), "visitorid", config.session_gap_minutes)
    return _canonical(sessions.filter(pl.col("event") == "view"))


def read_rees46(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Rees46 monthly CSVs: views only, sessionised per user at the inactivity gap."""
    _check_file(path)
    sep = config.separator or ","
    _check_columns(path, sep, ["event_time", "event_type", "product_id", "user_id"])
    raw = _scan_strings(path, sep).filter(pl.col("event_type") == "view")
    parses = {
        "user_id": _int("user_id", "an integer user id"),
        ITEM: _int("product_id", "an integer product id"),
        TIME: _datetime(
            "event_time", "a time such as '2019-10-01 00:00:00 UTC'", "%Y-%m-%d %H:%M:%S", " UTC$"
        ),
    }
    parsed = _strict_cast(raw, path, parses)
    return _canonical(_sessionise(parsed.lazy(), "user_id", config.session_gap_minutes))


def read_coveo(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Coveo ``browsing_train.csv``: product detail views, sessions split again at long gaps."""
    _check_file(path)
    sep = config.separator or ","
    required = ["session_id_hash", "product_action", "product_sku_hash", "server_timestamp_epoch_ms"]
    _check_columns(path, sep, required)
    raw = _scan_strings(path, sep).filter(
        (pl.col("product_action") == "detail") & pl.col("product_sku_hash").is_not_null()
    )
    parses = {
        ITEM: _text("product_sku_hash", "a product hash"),
        TIME: _epoch("server_timestamp_epoch_ms", "ms", "epoch milliseconds"),
    }
    parsed = _strict_cast(raw, path, parses)
    return _canonical(_sessionise(parsed.lazy(), "session_id_hash", config.session_gap_minutes))


def read_srgnn_tsv(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """SR-GNN-style preprocessed sessions ``session_id position item_id split`` (no timestamps).

    The given split and order are kept. Times are synthesised from file order (one second per
    session, one millisecond per position) only so that sorting is well defined; stats say so.
    """
    _check_file(path)
    sep = config.separator or "\t"
    _check_columns(path, sep, [SESSION, "position", ITEM, SPLIT])
    parses = {
        SESSION: _int(SESSION, "an integer session id"),
        "position": _int("position", "an integer position"),
        ITEM: _int(ITEM, "an integer item id"),
    }
    parsed = _strict_cast(_scan_strings(path, sep), path, parses)
    bad_split = parsed.filter(~pl.col(SPLIT).is_in(["train", "test"]))
    if bad_split.height:
        raise RecsysError(
            f"{path}: column 'split': expected 'train' or 'test', found {bad_split[SPLIT][0]!r}"
        )
    order = pl.col(SESSION).rank("dense").cast(pl.Int64)
    ts = (order * 1000 + pl.col("position")).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    return _canonical(parsed.lazy().with_columns(ts.alias(TIME)))


def read_table(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Any CSV/TSV/Parquet with a column mapping (canonical name -> file column) in the config."""
    _check_file(path)
    mapping = config.columns or {}
    missing_keys = [k for k in (SESSION, ITEM, TIME) if k not in mapping]
    if missing_keys:
        raise RecsysError(f"config data.source.columns: missing a mapping for {missing_keys}")
    unit = config.timestamp_unit
    if path.suffix.lower() == ".parquet":
        return _canonical(_read_parquet_table(path, mapping, unit))
    sep = config.separator or ("\t" if path.suffix.lower() in (".tsv", ".txt", ".dat") else ",")
    _check_columns(path, sep, list(mapping.values()))
    raw = _scan_strings(path, sep).select(pl.col(mapping[k]) for k in (SESSION, ITEM, TIME))
    if unit == "datetime":
        time = _datetime(mapping[TIME], "a date-time string such as 2024-01-31T12:00:00")
    else:
        time = _epoch(mapping[TIME], unit, f"a number of epoch {unit}")
    parsed = _strict_cast(raw, path, {TIME: time})
    parsed = parsed.with_columns(
        _maybe_int(parsed[mapping[ITEM]]).alias(ITEM),
        _maybe_int(parsed[mapping[SESSION]]).alias(SESSION),
    )
    return _canonical(parsed)


def _read_parquet_table(path: Path, mapping: dict[str, str], unit: str) -> pl.DataFrame:
    try:
        lf = pl.scan_parquet(path)
        names = lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise RecsysError(f"{path}: not a readable Parquet file: {exc}") from None
    missing = [c for c in mapping.values() if c not in names]
    if missing:
        raise RecsysError(f"{path}: missing column(s) {missing}; found {names}")
    lf = lf.select(pl.col(mapping[k]).alias(k) for k in (SESSION, ITEM, TIME))
    dtype = lf.collect_schema()[TIME]
    if dtype == pl.String:
        lf = lf.with_columns(pl.col(TIME).str.to_datetime(strict=True, time_zone="UTC"))
    elif dtype.is_numeric():
        lf = lf.with_columns(_epoch_expr(pl.col(TIME).cast(pl.Float64), "s" if unit == "datetime" else unit))
    elif isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        lf = lf.with_columns(pl.col(TIME).dt.replace_time_zone("UTC"))
    elif not isinstance(dtype, pl.Datetime):
        raise RecsysError(f"{path}: column {mapping[TIME]!r}: expected a time, found type {dtype}")
    try:
        return lf.with_columns(pl.col(TIME).cast(TIME_DTYPE)).collect()
    except pl.exceptions.PolarsError as exc:
        raise RecsysError(f"{path}: column {mapping[TIME]!r}: could not parse times: {exc}") from None


def _maybe_int(series: pl.Series) -> pl.Series:
    """Integer ids stay integers (compact, fast); anything else is kept as text."""
    as_int = series.cast(pl.Int64, strict=False)
    if as_int.null_count() == series.null_count():
        return as_int
    return series


READERS: dict[str, Callable[[Path, SourceConfig], pl.LazyFrame]] = {
    "yoochoose": read_yoochoose,
    "gru4rec_tsv": read_gru4rec_tsv,
    "diginetica": read_diginetica,
    "retailrocket": read_retailrocket,
    "rees46": read_rees46,
    "coveo": read_coveo,
    "srgnn_tsv": read_srgnn_tsv,
    "table": read_table,
}


def read_events(config: SourceConfig) -> pl.LazyFrame:
    """Canonical events of the configured source (several files are concatenated)."""
    if config.format == "synthetic":
        assert config.synthetic is not None
        return generate_clicks(config.synthetic).lazy()
    reader = READERS[config.format]
    frames = [reader(Path(p), config) for p in config.paths]
    if len(frames) == 1:
        return frames[0]
    try:
        return pl.concat(frames, how="vertical")
    except pl.exceptions.SchemaError as exc:
        raise RecsysError(f"the files {config.paths} do not share one schema: {exc}") from None
