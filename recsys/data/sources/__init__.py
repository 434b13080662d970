"""Canonical events from the configured source: which reader reads each format, and how the
files of a source make one log.

``READERS`` is the one table of source formats: ``parsing`` holds the strict parsing and its
errors, ``readers`` one reader per format, ``sessionise`` the cutting of user streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.config import SourceConfig
from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM, SESSION
from recsys.data.sources.readers import (
    parse_coveo,
    parse_rees46,
    parse_retailrocket,
    read_diginetica,
    read_gru4rec_tsv,
    read_srgnn_tsv,
    read_table,
    read_yoochoose,
)
from recsys.data.sources.sessionise import sessionise_streams
from recsys.data.synthetic import generate_clicks

Reader = Callable[[list[Path], SourceConfig], pl.LazyFrame]


def _harmonise(frames: list[pl.LazyFrame]) -> list[pl.LazyFrame]:
    """Files whose ids differ in type (integers in one, text in another) are joined as text."""
    schemas = [f.collect_schema() for f in frames]
    casts = [c for c in (SESSION, ITEM) if len({s[c] for s in schemas}) > 1]
    if not casts:
        return frames
    return [f.with_columns(pl.col(c).cast(pl.String) for c in casts) for f in frames]


@dataclass(frozen=True)
class _FileByFile:
    """Formats with their own session ids: each file is read alone, then the files are stacked."""

    read: Callable[[Path, SourceConfig], pl.LazyFrame]

    def __call__(self, paths: list[Path], config: SourceConfig) -> pl.LazyFrame:
        frames = [self.read(p, config) for p in paths]
        if len(frames) == 1:
            return frames[0]
        frames = _harmonise(frames)
        columns = {tuple(f.collect_schema().names()) for f in frames}
        if len(columns) > 1:
            raise RecsysError(f"the files {[str(p) for p in paths]} do not share one layout")
        return pl.concat(frames, how="vertical")


@dataclass(frozen=True)
class _Sessionised:
    """Formats without sessions: the user streams of all files are cut into sessions together."""

    parse: Callable[[Path, SourceConfig], pl.DataFrame]

    def __call__(self, paths: list[Path], config: SourceConfig) -> pl.LazyFrame:
        return sessionise_streams([self.parse(p, config) for p in paths], config)


def _synthetic(paths: list[Path], config: SourceConfig) -> pl.LazyFrame:
    assert config.synthetic is not None  # the config fills in the default
    return generate_clicks(config.synthetic).lazy()


READERS: dict[str, Reader] = {
    "synthetic": _synthetic,
    "yoochoose": _FileByFile(read_yoochoose),
    "gru4rec_tsv": _FileByFile(read_gru4rec_tsv),
    "diginetica": _FileByFile(read_diginetica),
    "retailrocket": _Sessionised(parse_retailrocket),
    "rees46": _Sessionised(parse_rees46),
    "coveo": _Sessionised(parse_coveo),
    "srgnn_tsv": _FileByFile(read_srgnn_tsv),
    "table": _FileByFile(read_table),
}


def read_events(config: SourceConfig) -> pl.LazyFrame:
    """Canonical events of the configured source (several files are read as one log)."""
    return READERS[config.format]([Path(p) for p in config.paths], config)
