"""Readers of public click-log formats, each mapped onto canonical events.

Canonical events have three columns: ``session_id``, ``item_id`` (integer or string ids as
found in the log) and ``timestamp`` (UTC, ms). The SR-GNN preprocessed logs also carry a
``split`` column, because their train/test split is given and they have no timestamps.

Text columns are parsed strictly in one streaming pass that keeps only the parsed columns, so
a large log never sits in memory as strings. Only when that pass fails is the file read again,
leniently, to find the first bad row: every problem is a ``RecsysError`` naming the file, the
column or line, and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.config import SourceConfig
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME, TIME_DTYPE
from recsys.data.synthetic import generate_clicks
from recsys.core.errors import RecsysError

_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_COMPRESSED = (".gz", ".zip", ".7z", ".bz2", ".xz", ".zst")
_USER = "__user"  # the column that sessionised formats cut into sessions
_KEEP = "__keep"  # sessionised formats: is this event kept after sessionising (e.g. a view)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RecsysError(f"{path}: file not found")
    if not path.is_file():
        raise RecsysError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise RecsysError(f"{path}: file is empty")
    if path.suffix.lower() in _COMPRESSED:
        raise RecsysError(
            f"{path}: a compressed archive; unpack it and point data.source.path at the file inside"
        )


def _header(path: Path) -> str:
    with path.open("rb") as fh:
        line = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")
    if not line.strip():
        raise RecsysError(f"{path}: file is empty (no header line)")
    return line


def _sep_name(separator: str) -> str:
    return _SEPARATORS.get(separator, repr(separator))


def _check_columns(path: Path, separator: str, required: list[str]) -> list[str]:
    """Validate the header: the columns exist, and the separator is the right one."""
    header = _header(path)
    columns = [c.strip().strip('"') for c in header.split(separator)]
    missing = [c for c in required if c not in columns]
    if not missing:
        return columns
    if len(columns) == 1:
        others = [name for s, name in _SEPARATORS.items() if s != separator and s in header]
        hint = f"; the header looks {others[0]}-separated" if others else ""
        raise RecsysError(
            f"{path}: expected {_sep_name(separator)}-separated columns {required}, found a "
            f"single column {header[:80]!r}{hint} (wrong delimiter?)"
        )
    raise RecsysError(
        f"{path}: missing column(s) {missing}; expected {required} "
        f"({_sep_name(separator)}-separated), found {columns}"
    )


@dataclass(frozen=True)
class _Parse:
    """How one output column is parsed from a file column, strictly and leniently.

    The strict form is the fast path; the lenient form (failures -> null) only runs after a
    failure, to find the first bad row for the error message.
    """

    column: str
    strict: pl.Expr
    lenient: pl.Expr
    expected: str


def _int(col: str, expected: str) -> _Parse:
    return _Parse(
        col,
        pl.col(col).cast(pl.Int64, strict=True),
        pl.col(col).cast(pl.Int64, strict=False),
        expected,
    )


def _text(col: str, expected: str) -> _Parse:
    return _Parse(col, pl.col(col).cast(pl.String), pl.col(col).cast(pl.String), expected)


_MS_PER_UNIT = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def _epoch_expr(number: pl.Expr, unit: str, strict: bool) -> pl.Expr:
    """Epoch number in ``unit`` -> UTC ms datetime; NaN and infinities fail (or become null)."""
    ms = (number * _MS_PER_UNIT[unit]).round(0)
    return ms.cast(pl.Int64, strict=strict).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")


def _epoch(col: str, unit: str, expected: str) -> _Parse:
    """Numeric epoch time in ``unit`` (text or numbers) -> UTC ms datetime."""
    return _Parse(
        col,
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=True), unit, strict=True),
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=False), unit, strict=False),
        expected,
    )


def _datetime(col: str, expected: str, fmt: str | None = None) -> _Parse:
    """Date-time text -> UTC ms datetime (``fmt=None``: polars infers the format)."""

    def parse(strict: bool) -> pl.Expr:
        text = pl.col(col).cast(pl.String)
        return text.str.to_datetime(fmt, strict=strict, time_zone="UTC").dt.cast_time_unit("ms")

    return _Parse(col, parse(True), parse(False), expected)


def _date(col: str, expected: str) -> _Parse:
    return _Parse(
        col,
        pl.col(col).str.to_date("%Y-%m-%d", strict=True),
        pl.col(col).str.to_date("%Y-%m-%d", strict=False),
        expected,
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _bad_line(path: Path, separator: str, line_offset: int) -> str | None:
    """The first text line that breaks the CSV layout: wrong field count or a stray quote."""
    n_fields = _header(path).count(separator) + 1 if line_offset > 1 else None
    try:
        lines = pl.scan_csv(
            path,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            new_columns=["line"],
            infer_schema=False,
        ).with_row_index("__row")
        fields = pl.col("line").str.count_matches(separator, literal=True) + 1
        quotes = pl.col("line").str.count_matches('"', literal=True)
        if n_fields is None:  # no header: the first line sets the layout
            n_fields = int(lines.select(fields.first()).collect().item())
        bad = (
            lines.filter(pl.col("line").is_not_null() & ((quotes % 2 == 1) | (fields != n_fields)))
            .with_columns(fields.alias("__fields"), quotes.alias("__quotes"))
            .head(1)
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError):
        return None
    if not bad.height:
        return None
    line_no = int(bad["__row"][0]) + 1
    text = bad["line"][0][:80]
    if bad["__quotes"][0] % 2 == 1:
        return f"line {line_no} has an unbalanced quote: {text!r}"
    return (
        f"line {line_no} has {bad['__fields'][0]} {_sep_name(separator)}-separated fields, "
        f"expected {n_fields}: {text!r}"
    )


def _strict_cast(
    frame: pl.LazyFrame,
    path: Path,
    parses: dict[str, _Parse],
    where: pl.Expr | None = None,
    separator: str | None = None,
    line_offset: int = 2,
) -> pl.DataFrame:
    """Parse columns strictly, keeping only the parsed ones.

    ``where`` selects the rows to parse (e.g. views only). On failure, name the column and the
    first bad line of a text file (``separator`` given; ``line_offset`` = file line of data row
    0) or the first bad row of a Parquet file, or else the first line that breaks the layout.
    """
    rows = frame if where is None else frame.filter(where)
    out = rows.select(**{name: p.strict for name, p in parses.items()})
    try:
        return out.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        failure = exc
    where_text = "line" if separator is not None else "row"
    try:
        numbered = frame.with_row_index("__row")
        if where is not None:
            numbered = numbered.filter(where)
        for p in parses.values():
            bad = (
                numbered.filter(pl.col(p.column).is_not_null() & p.lenient.is_null())
                .select("__row", pl.col(p.column).cast(pl.String))
                .head(1)
                .collect()
            )
            if bad.height:
                line = int(bad["__row"][0]) + (line_offset if separator is not None else 1)
                raise RecsysError(
                    f"{path}: column {p.column!r}: expected {p.expected}, found "
                    f"{bad[p.column][0]!r} on {where_text} {line}"
                )
    except pl.exceptions.PolarsError:
        pass  # the layout itself is broken; look at the raw lines below
    layout = _bad_line(path, separator, line_offset) if separator is not None else None
    raise RecsysError(f"{path}: could not parse the file: {layout or _first_line(failure)}")


def _scan_strings(
    path: Path, separator: str, has_header: bool = True, names: list[str] | None = None
) -> pl.LazyFrame:
    return pl.scan_csv(
        path, separator=separator, has_header=has_header, new_columns=names, infer_schema=False
    )


def _sessionise(frame: pl.LazyFrame, user: str, gap_minutes: float) -> pl.LazyFrame:
    """Cut each user's event stream into sessions at inactivity gaps longer than ``gap_minutes``.

    Session ids are 1, 2, ... in (user, time) order, so they are unique across all input files.
    """
    gap = pl.duration(milliseconds=int(round(gap_minutes * 60_000)))
    return frame.sort([user, TIME], maintain_order=True).with_columns(
        ((pl.col(user) != pl.col(user).shift(1)) | ((pl.col(TIME) - pl.col(TIME).shift(1)) > gap))
        .fill_null(True)
        .cum_sum()
        .cast(pl.Int64)
        .alias(SESSION)
    )


def _canonical(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    lf = frame.lazy()
    cols = [SESSION, ITEM, TIME]
    if SPLIT in lf.collect_schema().names():
        cols.append(SPLIT)
    return lf.select(cols)


# --- readers of formats with their own session ids -----------------------------------------


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
        TIME: _datetime(
            "Timestamp",
            "an ISO-8601 UTC time such as 2014-04-07T10:51:09.277Z",
            "%Y-%m-%dT%H:%M:%S%.fZ",
        ),
    }
    return _canonical(_strict_cast(raw, path, parses, separator=",", line_offset=1))


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
    return _canonical(_strict_cast(_scan_strings(path, sep), path, parses, separator=sep))


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
    parsed = _strict_cast(_scan_strings(path, sep), path, parses, separator=sep)
    day0 = (
        pl.col("eventdate").min().over(SESSION).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
    )
    time = day0 + pl.duration(milliseconds=pl.col("timeframe"))
    return _canonical(parsed.lazy().with_columns(time.alias(TIME)))


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
        SPLIT: _text(SPLIT, "'train' or 'test'"),
    }
    parsed = _strict_cast(_scan_strings(path, sep), path, parses, separator=sep)
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
    return _canonical(parsed.lazy().with_columns(ts.alias(TIME)))


def read_table(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Any CSV/TSV/Parquet with a column mapping (canonical name -> file column) in the config.

    Integer-looking ids become integers (compact, fast); anything else stays text.
    """
    _check_file(path)
    mapping = config.columns or {}
    missing_keys = [k for k in (SESSION, ITEM, TIME) if k not in mapping]
    if missing_keys:
        raise RecsysError(f"config data.source.columns: missing a mapping for {missing_keys}")
    unit = config.timestamp_unit
    if path.suffix.lower() in (".parquet", ".pq"):
        return _canonical(_plausible_times(_read_parquet_table(path, mapping, unit), path, config))
    sep = config.separator or ("\t" if path.suffix.lower() in (".tsv", ".txt", ".dat") else ",")
    _check_columns(path, sep, list(dict.fromkeys(mapping.values())))
    raw = _scan_strings(path, sep)
    if unit == "datetime":
        time = _datetime(mapping[TIME], "a date-time string such as 2024-01-31T12:00:00")
    else:
        time = _epoch(mapping[TIME], unit, f"a number of epoch {unit}")
    parses = {
        SESSION: _text(mapping[SESSION], "a session id"),
        ITEM: _text(mapping[ITEM], "an item id"),
        TIME: time,
    }
    parsed = _strict_cast(raw, path, parses, separator=sep)
    parsed = parsed.with_columns(_maybe_int(parsed[ITEM]), _maybe_int(parsed[SESSION]))
    return _canonical(_plausible_times(parsed, path, config))


_PLAUSIBLE_YEARS = (1995, 2100)


def _plausible_times(parsed: pl.DataFrame, path: Path, config: SourceConfig) -> pl.DataFrame:
    """Epoch numbers read in the wrong unit give dates in year 55,000 or in 1970: say so."""
    if config.timestamp_unit == "datetime" or parsed.height == 0:
        return parsed
    years = parsed.select(
        pl.col(TIME).dt.year().min().alias("low"), pl.col(TIME).dt.year().max().alias("high")
    ).row(0)
    low, high = years
    if low is None or (_PLAUSIBLE_YEARS[0] <= low and high < _PLAUSIBLE_YEARS[1]):
        return parsed
    column = (config.columns or {}).get(TIME)
    raise RecsysError(
        f"{path}: column {column!r}: read as epoch {config.timestamp_unit}, the times run from "
        f"year {low} to year {high}, not a click log's time span; check "
        f"data.source.timestamp_unit (s, ms, us or ns)"
    )


def _read_parquet_table(path: Path, mapping: dict[str, str], unit: str) -> pl.DataFrame:
    try:
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise RecsysError(f"{path}: not a readable Parquet file: {_first_line(exc)}") from None
    missing = [c for c in dict.fromkeys(mapping.values()) if c not in schema.names()]
    if missing:
        raise RecsysError(f"{path}: missing column(s) {missing}; found {schema.names()}")
    col = mapping[TIME]
    dtype = schema[col]
    if dtype == pl.String:
        time = _datetime(col, "a date-time string such as 2024-01-31T12:00:00")
    elif dtype.is_numeric():
        if unit == "datetime":
            raise RecsysError(
                f"{path}: column {col!r} holds numbers ({dtype}), but data.source.timestamp_unit "
                f"is 'datetime'; set it to the epoch unit: s, ms, us or ns"
            )
        time = _epoch(col, unit, f"a number of epoch {unit}")
    elif isinstance(dtype, pl.Datetime):
        as_utc = (
            pl.col(col).dt.replace_time_zone("UTC")
            if dtype.time_zone is None
            else pl.col(col).dt.convert_time_zone("UTC")
        )
        as_utc = as_utc.cast(TIME_DTYPE)
        time = _Parse(col, as_utc, as_utc, "a time")
    elif dtype == pl.Date:
        as_utc = pl.col(col).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")
        time = _Parse(col, as_utc, as_utc, "a date")
    else:
        raise RecsysError(f"{path}: column {col!r}: expected a time, found type {dtype}")
    ids = {
        SESSION: pl.col(mapping[SESSION]),
        ITEM: pl.col(mapping[ITEM]),
    }
    for name, expr in ids.items():
        if not (schema[mapping[name]].is_integer() or schema[mapping[name]] == pl.String):
            ids[name] = expr.cast(pl.String)
    parses = {k: _Parse(mapping[k], e, e, "an id") for k, e in ids.items()}
    parses[TIME] = time
    parsed = _strict_cast(lf, path, parses)
    return parsed.with_columns(
        pl.col(k).cast(pl.Int64) for k in (SESSION, ITEM) if parsed.schema[k].is_integer()
    ).with_columns(_maybe_int(parsed[k]) for k in (SESSION, ITEM) if parsed.schema[k] == pl.String)


def _maybe_int(series: pl.Series) -> pl.Series:
    """Integer ids stay integers (compact, fast); anything else is kept as text."""
    as_int = series.cast(pl.Int64, strict=False)
    if as_int.null_count() == series.null_count():
        return as_int
    return series


# --- formats without sessions (or with over-long ones): cut at inactivity gaps -------------


def _parse_retailrocket(path: Path, config: SourceConfig) -> pl.DataFrame:
    """RetailRocket ``events.csv``: every event (a view or not) counts for sessionising."""
    _check_file(path)
    sep = config.separator or ","
    _check_columns(path, sep, ["timestamp", "visitorid", "event", "itemid"])
    parses = {
        _USER: _int("visitorid", "an integer visitor id"),
        ITEM: _int("itemid", "an integer item id"),
        TIME: _epoch("timestamp", "ms", "epoch milliseconds"),
        _KEEP: _Parse("event", pl.col("event") == "view", pl.col("event") == "view", "an event"),
    }
    return _strict_cast(_scan_strings(path, sep), path, parses, separator=sep)


def _parse_rees46(path: Path, config: SourceConfig) -> pl.DataFrame:
    """Rees46 monthly CSVs: views only (other event types never parsed)."""
    _check_file(path)
    sep = config.separator or ","
    _check_columns(path, sep, ["event_time", "event_type", "product_id", "user_id"])
    parses = {
        _USER: _int("user_id", "an integer user id"),
        ITEM: _int("product_id", "an integer product id"),
        TIME: _datetime(
            "event_time", "a time such as '2019-10-01 00:00:00 UTC'", "%Y-%m-%d %H:%M:%S UTC"
        ),
    }
    views = pl.col("event_type") == "view"
    return _strict_cast(_scan_strings(path, sep), path, parses, where=views, separator=sep)


def _parse_coveo(path: Path, config: SourceConfig) -> pl.DataFrame:
    """Coveo ``browsing_train.csv``: product detail views within the given session hashes."""
    _check_file(path)
    sep = config.separator or ","
    required = [
        "session_id_hash",
        "product_action",
        "product_sku_hash",
        "server_timestamp_epoch_ms",
    ]
    _check_columns(path, sep, required)
    parses = {
        _USER: _text("session_id_hash", "a session hash"),
        ITEM: _text("product_sku_hash", "a product hash"),
        TIME: _epoch("server_timestamp_epoch_ms", "ms", "epoch milliseconds"),
    }
    details = (pl.col("product_action") == "detail") & pl.col("product_sku_hash").is_not_null()
    return _strict_cast(_scan_strings(path, sep), path, parses, where=details, separator=sep)


_SESSIONISED: dict[str, Callable[[Path, SourceConfig], pl.DataFrame]] = {
    "retailrocket": _parse_retailrocket,
    "rees46": _parse_rees46,
    "coveo": _parse_coveo,
}


def _sessionised(frames: list[pl.DataFrame], config: SourceConfig) -> pl.LazyFrame:
    """All files of a source together (a user's stream may span two monthly files), then cut."""
    events = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    sessions = _sessionise(events.lazy(), _USER, config.session_gap_minutes)
    if _KEEP in events.columns:
        sessions = sessions.filter(pl.col(_KEEP))
    return _canonical(sessions)


def read_retailrocket(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """RetailRocket ``events.csv``: sessionised per visitor on all events, then views kept."""
    return _sessionised([_parse_retailrocket(path, config)], config)


def read_rees46(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Rees46 monthly CSVs: views only, sessionised per user at the inactivity gap."""
    return _sessionised([_parse_rees46(path, config)], config)


def read_coveo(path: Path, config: SourceConfig) -> pl.LazyFrame:
    """Coveo ``browsing_train.csv``: product detail views, sessions split again at long gaps."""
    return _sessionised([_parse_coveo(path, config)], config)


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


def _harmonise(frames: list[pl.LazyFrame]) -> list[pl.LazyFrame]:
    """Files whose ids differ in type (integers in one, text in another) are joined as text."""
    schemas = [f.collect_schema() for f in frames]
    casts = [c for c in (SESSION, ITEM) if len({s[c] for s in schemas}) > 1]
    if not casts:
        return frames
    return [f.with_columns(pl.col(c).cast(pl.String) for c in casts) for f in frames]


def read_events(config: SourceConfig) -> pl.LazyFrame:
    """Canonical events of the configured source (several files are read as one log)."""
    if config.format == "synthetic":
        assert config.synthetic is not None
        return generate_clicks(config.synthetic).lazy()
    paths = [Path(p) for p in config.paths]
    if config.format in _SESSIONISED:
        parse = _SESSIONISED[config.format]
        return _sessionised([parse(p, config) for p in paths], config)
    reader = READERS[config.format]
    frames = [reader(p, config) for p in paths]
    if len(frames) == 1:
        return frames[0]
    frames = _harmonise(frames)
    columns = {tuple(f.collect_schema().names()) for f in frames}
    if len(columns) > 1:
        raise RecsysError(f"the files {[str(p) for p in paths]} do not share one layout")
    return pl.concat(frames, how="vertical")
