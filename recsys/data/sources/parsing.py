"""Strict, streaming parsing of click-log files, and the one-line errors when a file is wrong.

Text columns are parsed strictly in one streaming pass that keeps only the parsed columns, so
a large log never sits in memory as strings. Only when that pass fails is the file read again,
leniently, to find the first bad row: every problem is a ``RecsysError`` naming the file, the
column or line, and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.config import SourceConfig
from recsys.core.errors import RecsysError, first_line
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME

_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_COMPRESSED = (".gz", ".zip", ".7z", ".bz2", ".xz", ".zst")
ERROR_LINE_LIMIT = 200  # characters of a library's own message quoted in a parse error


def check_file(path: Path) -> None:
    """A readable, non-empty, uncompressed file, or an error saying which of these it is not."""
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


def header_line(path: Path) -> str:
    """The first line of a text file (a header, or the first row of a header-less log)."""
    with path.open("rb") as fh:
        line = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")
    if not line.strip():
        raise RecsysError(f"{path}: file is empty (no header line)")
    return line


def _sep_name(separator: str) -> str:
    return _SEPARATORS.get(separator, repr(separator))


def check_columns(path: Path, separator: str, required: list[str]) -> list[str]:
    """Validate the header: the columns exist, and the separator is the right one."""
    header = header_line(path)
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
class Parse:
    """How one output column is parsed from a file column, strictly and leniently.

    The strict form is the fast path; the lenient form (failures -> null) only runs after a
    failure, to find the first bad row for the error message.
    """

    column: str
    strict: pl.Expr
    lenient: pl.Expr
    expected: str


def as_int(col: str, expected: str) -> Parse:
    return Parse(
        col,
        pl.col(col).cast(pl.Int64, strict=True),
        pl.col(col).cast(pl.Int64, strict=False),
        expected,
    )


def as_text(col: str, expected: str) -> Parse:
    return Parse(col, pl.col(col).cast(pl.String), pl.col(col).cast(pl.String), expected)


_MS_PER_UNIT = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def _epoch_expr(number: pl.Expr, unit: str, strict: bool) -> pl.Expr:
    """Epoch number in ``unit`` -> UTC ms datetime; NaN and infinities fail (or become null)."""
    ms = (number * _MS_PER_UNIT[unit]).round(0)
    return ms.cast(pl.Int64, strict=strict).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC")


def as_epoch(col: str, unit: str, expected: str) -> Parse:
    """Numeric epoch time in ``unit`` (text or numbers) -> UTC ms datetime."""
    return Parse(
        col,
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=True), unit, strict=True),
        _epoch_expr(pl.col(col).cast(pl.Float64, strict=False), unit, strict=False),
        expected,
    )


def as_datetime(col: str, expected: str, fmt: str | None = None) -> Parse:
    """Date-time text -> UTC ms datetime (``fmt=None``: polars infers the format)."""

    def parse(strict: bool) -> pl.Expr:
        text = pl.col(col).cast(pl.String)
        return text.str.to_datetime(fmt, strict=strict, time_zone="UTC").dt.cast_time_unit("ms")

    return Parse(col, parse(True), parse(False), expected)


def as_date(col: str, expected: str) -> Parse:
    return Parse(
        col,
        pl.col(col).str.to_date("%Y-%m-%d", strict=True),
        pl.col(col).str.to_date("%Y-%m-%d", strict=False),
        expected,
    )


def _bad_line(path: Path, separator: str, line_offset: int) -> str | None:
    """The first text line that breaks the CSV layout: wrong field count or a stray quote."""
    n_fields = header_line(path).count(separator) + 1 if line_offset > 1 else None
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


def strict_cast(
    frame: pl.LazyFrame,
    path: Path,
    parses: dict[str, Parse],
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
    cause = layout or first_line(failure, limit=ERROR_LINE_LIMIT)
    raise RecsysError(f"{path}: could not parse the file: {cause}")


def scan_strings(
    path: Path, separator: str, has_header: bool = True, names: list[str] | None = None
) -> pl.LazyFrame:
    """Every column as text, so that the strict casts, not the CSV reader, judge each value."""
    return pl.scan_csv(
        path, separator=separator, has_header=has_header, new_columns=names, infer_schema=False
    )


def read_delimited(
    path: Path,
    separator: str,
    required: list[str],
    parses: dict[str, Parse],
    where: pl.Expr | None = None,
) -> pl.DataFrame:
    """A delimited text file with a header: check the ``required`` columns, then parse strictly
    (only the rows ``where`` selects, if given)."""
    check_columns(path, separator, required)
    frame = scan_strings(path, separator)
    return strict_cast(frame, path, parses, where=where, separator=separator)


_PLAUSIBLE_YEARS = (1995, 2100)


def plausible_times(parsed: pl.DataFrame, path: Path, config: SourceConfig) -> pl.DataFrame:
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


def maybe_int(series: pl.Series) -> pl.Series:
    """Integer ids stay integers (compact, fast); anything else is kept as text."""
    ints = series.cast(pl.Int64, strict=False)
    if ints.null_count() == series.null_count():
        return ints
    return series


def canonical(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Only the canonical columns, in their order (plus ``split`` where the format gives one)."""
    lf = frame.lazy()
    cols = [SESSION, ITEM, TIME]
    if SPLIT in lf.collect_schema().names():
        cols.append(SPLIT)
    return lf.select(cols)
