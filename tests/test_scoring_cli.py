"""`recsys recommend` and `recsys score` as real subprocesses, on a model trained on a real log."""

from __future__ import annotations

import struct
from pathlib import Path

import polars as pl
import pytest

from recsys.core.errors import RecsysError
from recsys.data.preparation import PreparedDataset
from recsys.data.schema import ITEM, SESSION, TIME
from recsys.serving.batch import score_file
from recsys.serving.recommender import Recommendation, SessionRecommender
from tests.conftest import run_cli
from tests.helpers import assert_same, real_sessions

# One torch thread in the subprocesses: on a busy 2-core machine two threads are ~10x slower.
ENV = {"OMP_NUM_THREADS": "1", "RECSYS_QUIET": "0"}


@pytest.fixture(scope="module")
def rec(trained: tuple[PreparedDataset, Path]) -> SessionRecommender:
    return SessionRecommender.load(trained[1])


@pytest.fixture(scope="module")
def sessions_file(
    trained: tuple[PreparedDataset, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The real test sessions as (session_id, items), plus an unknown-only and an empty one."""
    lists = trained[0].test.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM).alias("items"))
    extra = pl.DataFrame(
        {SESSION: [-1, -2], "items": [[999_999_999], []]},
        schema={SESSION: pl.Int64, "items": pl.List(pl.Int64)},
    )
    path = tmp_path_factory.mktemp("input") / "sessions.parquet"
    pl.concat([lists, extra]).write_parquet(path, row_group_size=500)
    return path


def table_rows(stdout: str) -> list[tuple[int, str, str]]:
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "item_id", "score"]
    return [(int(r), i, s) for r, i, s in (line.split() for line in lines[2:])]


# --- recommend -----------------------------------------------------------------------------------


def test_recommend_prints_the_ranked_table(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path]
) -> None:
    session = real_sessions(trained[0], 1)[0][:3]
    items = ", ".join(str(i) for i in session) + ",not-an-item"
    proc = run_cli("recommend", "--model", str(trained[1]), "--items", items, "-k", "7", env=ENV)
    assert proc.returncode == 0, proc.stderr
    expected = rec.recommend(session, k=7)
    assert table_rows(proc.stdout) == [
        (rank + 1, str(item), f"{score:.4f}")
        for rank, (item, score) in enumerate(zip(expected.items, expected.scores, strict=True))
    ]
    assert "skipped unknown item ids: not-an-item" in proc.stderr


def test_recommend_for_an_unknown_session_shows_popular_items(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path]
) -> None:
    proc = run_cli("recommend", "-m", str(trained[1].parent), "-i", "x,y", "-k", "3", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert [i for _, i, _ in table_rows(proc.stdout)] == [str(i) for i in rec.popular(3).items]
    assert "most popular items" in proc.stderr


# --- score ---------------------------------------------------------------------------------------


def read_output(path: Path) -> dict[int, Recommendation]:
    out = pl.read_parquet(path)
    assert out.columns == [SESSION, "items", "scores", "unknown_items", "fallback_popular"]
    return {
        row[SESSION]: Recommendation(
            row["items"],
            row["scores"],
            row["unknown_items"],
            "popular" if row["fallback_popular"] else None,
        )
        for row in out.iter_rows(named=True)
    }


def as_stored(rec: Recommendation) -> Recommendation:
    """What the output file holds: unknown ids as text."""
    return Recommendation(rec.items, rec.scores, [str(u) for u in rec.unknown], rec.fallback)


def test_score_writes_one_row_per_session(
    rec: SessionRecommender,
    trained: tuple[PreparedDataset, Path],
    sessions_file: Path,
    tmp_path: Path,
) -> None:
    output = tmp_path / "out" / "recs.parquet"
    args = ["--input", str(sessions_file), "--output", str(output), "-k", "10"]
    proc = run_cli("score", "--model", str(trained[1]), *args, env=ENV)
    assert proc.returncode == 0, proc.stderr
    sessions = pl.read_parquet(sessions_file)
    got = read_output(output)
    assert list(got) == sessions[SESSION].to_list()  # one row per session, input order
    for sid, items in zip(sessions[SESSION].to_list(), sessions["items"].to_list(), strict=True):
        # another process, another batch shape: equal up to float rounding
        assert_same(got[sid], as_stored(rec.recommend(items, k=10)), atol=1e-5)
    assert got[-1].unknown == ["999999999"] and got[-1].fallback == "popular"
    assert got[-2].unknown == [] and got[-2].fallback == "popular"
    assert f"wrote {len(got):,} sessions" in proc.stdout
    assert "1 unknown item ids skipped, 2 popularity fallbacks" in proc.stdout
    assert f"100.0% {len(got)}/{len(got)}" in proc.stderr  # the progress line
    assert sorted(p.name for p in output.parent.iterdir()) == ["recs.parquet"]


def test_score_reads_click_rows_in_time_order(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path], tmp_path: Path
) -> None:
    """A raw click log interleaves sessions; each session's clicks stay in their order."""
    clicks = trained[0].test.sort(TIME, maintain_order=True).select(SESSION, ITEM)
    clicks.write_parquet(tmp_path / "clicks.parquet")
    output = tmp_path / "recs.parquet"
    args = ["--input", str(tmp_path / "clicks.parquet"), "--output", str(output), "-k", "5"]
    proc = run_cli("score", "--model", str(trained[1]), "--exclude-seen", *args, env=ENV)
    assert proc.returncode == 0, proc.stderr
    got = read_output(output)
    grouped = clicks.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM))
    assert list(got) == grouped[SESSION].to_list()
    for sid, items in grouped.iter_rows():
        assert_same(got[sid], rec.recommend(items, k=5, exclude_seen=True), atol=1e-5)


def corrupt_last_row_group(source: Path, target: Path) -> None:
    """Damage the compressed data of the file's last row group (a bad disk or a torn copy).

    The footer stays intact, so the file opens and its first row groups read fine.
    """
    pl.read_parquet(source).write_parquet(
        target, row_group_size=500, compression="zstd", statistics=False
    )
    raw = bytearray(target.read_bytes())
    footer = struct.unpack("<I", raw[-8:-4])[0]
    data_end = len(raw) - 8 - footer
    for i in range(data_end - 300, data_end - 100):
        raw[i] ^= 0x5A
    target.write_bytes(bytes(raw))


def test_a_failure_midway_leaves_no_partial_output(
    trained: tuple[PreparedDataset, Path], sessions_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "damaged.parquet"
    corrupt_last_row_group(sessions_file, bad)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "recs.parquet"
    previous.write_bytes(b"the previous good output")
    for output in (previous, out_dir / "new.parquet"):
        args = ["--input", str(bad), "--output", str(output), "--batch-size", "16"]
        proc = run_cli("score", "--model", str(trained[1]), *args, env=ENV)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        # 64 batches of 16 are read at a time: it broke on the third slice, not on opening
        assert "reading failed after 2,048 of" in proc.stderr
        assert "no output was written" in proc.stderr
        assert previous.read_bytes() == b"the previous good output"
        assert sorted(p.name for p in out_dir.iterdir()) == ["recs.parquet"]


def write(path: Path, frame: pl.DataFrame) -> Path:
    frame.write_parquet(path)
    return path


def test_bad_inputs_give_clear_errors(
    trained: tuple[PreparedDataset, Path], sessions_file: Path, tmp_path: Path
) -> None:
    """As subprocesses: one line of explanation, exit code 1, no traceback, no output."""
    model = str(trained[1])
    wrong_columns = write(tmp_path / "w.parquet", pl.DataFrame({"user": [1], "items": [[1, 2]]}))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (tmp_path / "missing.parquet", tmp_path / "out.parquet", "input file not found"),
        (
            wrong_columns,
            tmp_path / "out.parquet",
            "expected columns (session_id, items) or (session_id, item_id); found ['user', 'items']",
        ),
        (sessions_file, a_file / "out.parquet", "cannot write the output"),
    ]
    for input_path, output, message in cases:
        args = ["--input", str(input_path), "--output", str(output)]
        proc = run_cli("score", "--model", model, *args, env=ENV)
        assert proc.returncode == 1, (message, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not output.exists()


def test_input_checks_name_the_problem(
    rec: SessionRecommender, sessions_file: Path, tmp_path: Path
) -> None:
    """The same checks in-process (cheaper than a subprocess each)."""
    not_parquet = tmp_path / "clicks.csv"
    not_parquet.write_text("session_id,item_id\n1,2\n")
    not_lists = write(tmp_path / "n.parquet", pl.DataFrame({SESSION: [1], "items": [5]}))
    float_ids = write(tmp_path / "f.parquet", pl.DataFrame({SESSION: [1], ITEM: [1.5]}))
    nested = write(tmp_path / "l.parquet", pl.DataFrame({SESSION: [1], "items": [[[1], [2]]]}))
    cases = [
        (not_parquet, "not a readable Parquet file"),
        (not_lists, "column 'items' must be a list of item ids per session, found Int64"),
        (float_ids, "column 'item_id' must hold integer or string item ids, found Float64"),
        (nested, "column 'items[]' must hold integer or string item ids, found List(Int64)"),
    ]
    for input_path, message in cases:
        with pytest.raises(RecsysError) as err:
            score_file(rec, input_path, tmp_path / "out.parquet")
        assert message in str(err.value)
        assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(RecsysError, match="would overwrite the input"):
        score_file(rec, sessions_file, sessions_file)
