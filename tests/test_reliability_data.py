"""No silent data damage (issue #19): what a click log's file says is read as it says, or refused
with one line naming the file, the column and the line. Every case runs ``recsys prepare`` as a
subprocess on a small table log written here.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from tests.conftest import run_cli, tiny_config, write_config

T0 = 1_700_000_000  # 2023-11-14, epoch seconds


def clicks(n_sessions: int = 600) -> list[tuple[int, int, int]]:
    """(session, item, epoch s): 4 clicks per session over 30 items, one session a minute."""
    return [
        (s, 1 + (s * 7 + j * 3) % 30, T0 + s * 60 + j) for s in range(n_sessions) for j in range(4)
    ]


def table_config(tmp_path: Path, log: Path, unit: str = "s") -> Path:
    source = {
        "format": "table",
        "path": str(log),
        "columns": {"session_id": "sid", "item_id": "iid", "timestamp": "ts"},
        "timestamp_unit": unit,
    }
    config = tiny_config(
        tmp_path / "data",
        data={"source": source, "preparation": {"test_days": 0.05, "min_item_support": 1}},
    )
    return write_config(tmp_path / "config.yaml", config)


def write_log(path: Path, rows: list[tuple[Any, Any, Any]]) -> Path:
    path.write_text("sid,iid,ts\n" + "".join(f"{s},{i},{t}\n" for s, i, t in rows))
    return path


def prepare(tmp_path: Path, rows: list[tuple[Any, Any, Any]], unit: str = "s") -> Any:
    config = table_config(tmp_path, write_log(tmp_path / "log.csv", rows), unit)
    return run_cli("prepare", "--config", str(config))


def one_error_line(proc: Any) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def prepared(tmp_path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    folder = tmp_path / "data" / "tiny" / "prepared"
    stats = json.loads((folder / "stats.json").read_text())
    return pl.read_parquet(folder / "items.parquet"), stats


def test_missing_value_spellings_in_item_ids_are_counted_and_dropped(tmp_path: Path) -> None:
    spellings = ["NaN", "nan", "NA", "null", "", " None ", "N/A"]
    rows = [
        (s, spellings[k // 4 % len(spellings)] if k % 4 == 1 and k % 40 < 8 else i, t)
        for k, (s, i, t) in enumerate(clicks())
    ]
    missing = sum(1 for _, i, _ in rows if isinstance(i, str))
    proc = prepare(tmp_path, rows)
    assert proc.returncode == 0, proc.stderr
    items, stats = prepared(tmp_path)
    assert items.schema["item_id"] == pl.Int64  # the column did not turn to text
    assert stats["dropped"]["missing_values"] == missing
    assert stats["dropped"]["missing_by_column"]["item_id"] == missing
    assert stats["id_types"] == {"session_id": "int", "item_id": "int"}
    assert f"{missing:,} rows with missing values" in proc.stdout


def test_float_looking_integer_ids_are_integers(tmp_path: Path) -> None:
    proc = prepare(tmp_path, [(f"{s}.0", f"{i}.0", t) for s, i, t in clicks()])
    assert proc.returncode == 0, proc.stderr
    items, stats = prepared(tmp_path)
    assert items.schema["item_id"] == pl.Int64
    assert sorted(items["item_id"].to_list()) == list(range(1, 31))
    assert stats["id_types"] == {"session_id": "int", "item_id": "int"}
    assert "ids read as session_id integers, item_id integers" in proc.stdout


def test_text_ids_stay_text_and_stats_say_so(tmp_path: Path) -> None:
    proc = prepare(tmp_path, [(s, f"sku-{i}", t) for s, i, t in clicks()])
    assert proc.returncode == 0, proc.stderr
    items, stats = prepared(tmp_path)
    assert items.schema["item_id"] == pl.String
    assert stats["id_types"]["item_id"] == "str"


def test_times_in_year_1900_are_refused_like_epoch_numbers_are(tmp_path: Path) -> None:
    base = datetime(1900, 1, 1)
    rows = [(s, i, (base + timedelta(seconds=t - T0)).isoformat()) for s, i, t in clicks()]
    line = one_error_line(prepare(tmp_path, rows, unit="datetime"))
    assert "log.csv: column 'ts'" in line and "year 1900" in line


def test_mixed_offset_and_naive_times_name_one_of_each(tmp_path: Path) -> None:
    def text(k: int, t: int) -> str:
        iso = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return iso + "+01:00" if k < 3 else iso

    rows = [(s, i, text(k, t)) for k, (s, i, t) in enumerate(clicks())]
    line = one_error_line(prepare(tmp_path, rows, unit="datetime"))
    assert "column 'ts' mixes times with a UTC offset" in line
    assert "on line 2)" in line and "on line 5)" in line  # the first of each kind


def test_an_unbalanced_quote_points_at_its_own_line(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", clicks())
    lines = log.read_text().splitlines()
    lines[499] = lines[499].replace(",", ',"', 1)  # file line 500
    lines[800] += '"'  # a second stray quote would close the field 300 lines later
    log.write_text("\n".join(lines) + "\n")
    proc = run_cli("prepare", "--config", str(table_config(tmp_path, log)))
    line = one_error_line(proc)
    assert "log.csv: could not parse the file: line 500 has an unbalanced quote" in line


def test_gzip_data_named_csv_is_reported_as_compressed(tmp_path: Path) -> None:
    log = write_log(tmp_path / "plain.csv", clicks())
    packed = tmp_path / "log.csv"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    line = one_error_line(run_cli("prepare", "--config", str(table_config(tmp_path, packed))))
    assert "log.csv: the file holds gzip-compressed data" in line
    assert "\ufffd" not in line and "delimiter" not in line


def test_a_missing_relative_path_names_the_folder_it_was_read_from(tmp_path: Path) -> None:
    config = table_config(tmp_path, Path("no-such-log.csv"))
    line = one_error_line(run_cli("prepare", "--config", str(config), cwd=tmp_path))
    assert f"no-such-log.csv: file not found (relative paths are read from {tmp_path})" in line
