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
# How exports spell a missing id (pandas, R, SQL dumps, spreadsheets): read as missing, counted
# and dropped by preparation, never as an item called "NaN". Compared after strip, any case.
MISSING_SPELLINGS = ("", "nan", "na", "n/a", "#n/a", "null", "none", "<na>", "nil", "-", "?")
# the first bytes of compressed data, whatever the file is called
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"(\xb5/\xfd": "zstd",
    b"7z\xbc\xaf\x27\x1c": "7z",
}


def check_file(path: Path) -> None:
    """A readable, non-empty, uncompressed file, or an error saying which of these it is not."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise RecsysError(f"{path}: file not found{where}")
    if not path.is_file():
        raise RecsysError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise RecsysError(f"{path}: file is empty")
    if path.suffix.lower() in _COMPRESSED:
        raise RecsysError(
            f"{path}: a compressed archive; unpack it and point data.source.path at the file inside"
        )
    with path.open("rb") as fh:
        head = fh.read(8)
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise RecsysError(
            f"{path}: the file holds {kind}-compressed data, not text (whatever its name says); "
            f"unpack it and point data.source.path at the unpacked file"
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
    datetime_text: bool = False  # a bad value may be a mix of offset and naive times


def missing_as_null(col: str) -> pl.Expr:
    """The column as text, with every ``MISSING_SPELLINGS`` value (any case, padded) null."""
    text = pl.col(col).cast(pl.String)
    missing = text.str.strip_chars().str.to_lowercase().is_in(MISSING_SPELLINGS)
    return pl.when(missing).then(None).otherwise(text).alias(col)


def as_int(col: str, expected: str) -> Parse:
    """An integer id; missing spellings are missing values, not parse errors."""
    return Parse(
        col,
        missing_as_null(col).cast(pl.Int64, strict=True),
        missing_as_null(col).cast(pl.Int64, strict=False),
        expected,
    )


def as_text(col: str, expected: str) -> Parse:
    """A text id (``id_column`` decides later whether it is an integer after all)."""
    return Parse(col, missing_as_null(col), missing_as_null(col), expected)


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

    return Parse(col, parse(True), parse(False), expected, datetime_text=True)


_OFFSET = r"(Z|[+-]\d{2}:?\d{2}|\s?UTC)$"  # a date-time text that ends in its UTC offset


def _offset_mix(numbered: pl.LazyFrame, col: str, base: int, where_text: str) -> str | None:
    """Where a date-time column mixes times with an offset and times without one (polars
    takes the format from the first values, so the others look unparseable): one example each."""
    text = pl.col(col).cast(pl.String).str.strip_chars()
    has = text.str.contains(_OFFSET)
    examples = (
        numbered.filter(pl.col(col).is_not_null())
        .select("__row", text.alias("v"), has.alias("offset"))
        .group_by("offset")
        .agg(pl.all().first())
        .collect()
    )
    if examples.height < 2:
        return None
    rows = {bool(r["offset"]): r for r in examples.iter_rows(named=True)}
    with_, without = rows[True], rows[False]
    return (
        f"column {col!r} mixes times with a UTC offset ({with_['v']!r} on {where_text} "
        f"{with_['__row'] + base}) and times without one ({without['v']!r} on {where_text} "
        f"{without['__row'] + base}); write every time with its offset, or none (then read as UTC)"
    )


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
        parsed = out.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        failure = exc
    else:
        if separator is not None and _spans_lines(parsed):
            # a stray quote made one field of many lines: the ids are not what the file says
            layout = _bad_line(path, separator, line_offset)
            cause = layout or "a quoted field spans several lines (an unbalanced quote)"
            raise RecsysError(f"{path}: could not parse the file: {cause}")
        return parsed
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
                base = line_offset if separator is not None else 1
                line = int(bad["__row"][0]) + base
                found = str(bad[p.column][0])
                if separator is not None and ("\n" in found or '"' in found):
                    layout = _bad_line(path, separator, line_offset)
                    if layout:
                        raise RecsysError(f"{path}: could not parse the file: {layout}")
                mix = _offset_mix(numbered, p.column, base, where_text) if p.datetime_text else None
                if mix:
                    raise RecsysError(f"{path}: {mix}")
                raise RecsysError(
                    f"{path}: column {p.column!r}: expected {p.expected}, found "
                    f"{bad[p.column][0]!r} on {where_text} {line}"
                )
    except pl.exceptions.PolarsError:
        pass  # the layout itself is broken; look at the raw lines below
    layout = _bad_line(path, separator, line_offset) if separator is not None else None
    cause = layout or first_line(failure, limit=ERROR_LINE_LIMIT)
    raise RecsysError(f"{path}: could not parse the file: {cause}")


def _spans_lines(parsed: pl.DataFrame) -> bool:
    """Whether a parsed text value holds a line break (no id or label of a click log does)."""
    text = [c for c, t in parsed.schema.items() if t == pl.String]
    if not text or parsed.height == 0:
        return False
    found = parsed.select(
        pl.any_horizontal(pl.col(c).str.contains("\n", literal=True).any() for c in text)
    )
    return bool(found.item())


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
    """Epoch numbers read in the wrong unit give dates in year 55,000 or in 1970, and a time
    column written without its date gives 1900: neither is a click log's span, say so."""
    if parsed.height == 0:
        return parsed
    years = parsed.select(
        pl.col(TIME).dt.year().min().alias("low"), pl.col(TIME).dt.year().max().alias("high")
    ).row(0)
    low, high = years
    if low is None or (_PLAUSIBLE_YEARS[0] <= low and high < _PLAUSIBLE_YEARS[1]):
        return parsed
    column = (config.columns or {}).get(TIME)
    span = f"the times run from year {low} to year {high}, not a click log's time span"
    if config.timestamp_unit == "datetime":
        raise RecsysError(
            f"{path}: column {column!r}: read as date-time text, {span} (expected years "
            f"{_PLAUSIBLE_YEARS[0]}-{_PLAUSIBLE_YEARS[1] - 1}); check that the column holds "
            f"full dates, not only times of day or placeholders"
        )
    raise RecsysError(
        f"{path}: column {column!r}: read as epoch {config.timestamp_unit}, {span}; check "
        f"data.source.timestamp_unit (s, ms, us or ns)"
    )


_EXACT_FLOAT = 2**53  # integers above this are not exact as floats


def id_column(series: pl.Series) -> pl.Series:
    """Ids as integers when every present value is one (``5002`` or the ``5002.0`` a float
    column or a spreadsheet writes), else as text; missing spellings and NaN are null.

    Integer ids are compact and fast, and they match the JSON numbers clients send.
    """
    if series.dtype.is_integer():
        return series.cast(pl.Int64)
    if series.dtype.is_float():
        numbers = series.fill_nan(None)
    else:
        text = series.to_frame("v").select(missing_as_null("v")).to_series().alias(series.name)
        ints = text.cast(pl.Int64, strict=False)
        if ints.null_count() == text.null_count():
            return ints
        numbers = text.cast(pl.Float64, strict=False)
        if numbers.null_count() != text.null_count():
            return text
    whole = numbers.is_null() | (
        numbers.is_finite() & (numbers.round(0) == numbers) & (numbers.abs() < _EXACT_FLOAT)
    )
    if bool(whole.all()):
        return numbers.cast(pl.Int64).alias(series.name)
    if series.dtype.is_float():
        return numbers.cast(pl.String).alias(series.name)
    return text


def canonical(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Only the canonical columns, in their order (plus ``split`` where the format gives one)."""
    lf = frame.lazy()
    cols = [SESSION, ITEM, TIME]
    if SPLIT in lf.collect_schema().names():
        cols.append(SPLIT)
    return lf.select(cols)
