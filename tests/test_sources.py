"""Readers: every public format mapped onto canonical events, on real logs or faithful copies.

The shared logs (../shared/data) check the readers against known statistics; small files written
here in each documented layout check sessionising, event filtering and time parsing by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from recsys.config import SourceConfig, load_config
from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM, SESSION, SPLIT, TIME, TIME_DTYPE
from recsys.data.sources import read_events
from tests.conftest import ROOT, shared_path


def events_of(**source: object) -> pl.DataFrame:
    return read_events(SourceConfig(**source)).collect()  # type: ignore[arg-type]


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def sessions_of(events: pl.DataFrame) -> list[list[object]]:
    """Item sequences of the sessions, in time order, sessions ordered by their first event."""
    ordered = events.sort([SESSION, TIME], maintain_order=True)
    grouped = ordered.group_by(SESSION, maintain_order=True).agg(
        pl.col(ITEM), pl.col(TIME).min().alias("start")
    )
    return grouped.sort("start")[ITEM].to_list()


def check_canonical(events: pl.DataFrame) -> None:
    assert events.columns[:3] == [SESSION, ITEM, TIME]
    assert events.schema[TIME] == TIME_DTYPE


# --- real logs ----------------------------------------------------------------------------


def test_gru4rec_tsv_reads_rsc15_train_and_test_files(monkeypatch: pytest.MonkeyPatch) -> None:
    shared_path("yoochoose-rsc15-100k", "yoochoose-clicks-100k_test.txt")
    monkeypatch.chdir(ROOT)
    config = load_config("configs/yoochoose-100k.yaml")
    assert len(config.data.source.paths) == 2
    events = read_events(config.data.source).collect()
    check_canonical(events)
    assert events.schema[SESSION] == pl.Int64 and events.schema[ITEM] == pl.Int64
    # PROVENANCE: train_full + test = 83,846 events, 21,210 sessions, 2,933 items, 7 days.
    assert events.height == 70_278 + 13_568
    assert events[SESSION].n_unique() == 21_210
    assert events[ITEM].n_unique() == 2_933
    # First row of train_full: 3  214716935  1396437466.94 (epoch seconds, ms precision).
    first = events.row(0, named=True)
    assert (first[SESSION], first[ITEM]) == (3, 214716935)
    assert ms(first[TIME]) == 1396437466940
    assert events[TIME].min() >= utc(2014, 4, 1) and events[TIME].max() < utc(2014, 4, 8, 1)


def test_diginetica_raw_sample() -> None:
    path = shared_path("diginetica-sample", "sample_train-item-views.csv")
    events = events_of(format="diginetica", path=path)
    check_canonical(events)
    # PROVENANCE: 12,391 rows, 2,986 sessions, 7,139 items, 2016-01-03 .. 2016-06-01.
    assert (events.height, events[SESSION].n_unique(), events[ITEM].n_unique()) == (
        12_391,
        2_986,
        7_139,
    )
    # Row `1;NA;81766;526309;2016-05-09`: time = eventdate + timeframe ms.
    row = events.filter((pl.col(SESSION) == 1) & (pl.col(ITEM) == 81766)).row(0, named=True)
    assert row[TIME] == utc(2016, 5, 9) + timedelta(milliseconds=526309)
    # Session 629 runs past midnight: rows dated 2016-03-21 still count from its first date.
    late = events.filter(pl.col(SESSION) == 629)[TIME]
    assert late.min() == utc(2016, 3, 20) + timedelta(milliseconds=13879)
    assert utc(2016, 3, 20) + timedelta(milliseconds=1166856) in late.to_list()  # dated 03-21


def test_srgnn_tsv_keeps_the_given_split_and_click_order() -> None:
    path = shared_path("diginetica", "diginetica_sessions.tsv")
    events = events_of(format="srgnn_tsv", path=path)
    assert events.columns == [SESSION, ITEM, TIME, SPLIT]
    counts = dict(events.group_by(SPLIT).len().iter_rows())
    assert counts == {"train": 906_140, "test": 76_821}
    # Synthesised times follow file order: sessions in order, positions in order.
    assert events[TIME].is_sorted()
    assert events.filter(pl.col(SESSION) == 1)[ITEM].to_list()[:2] == [1, 2]


# --- formats written here in their documented layouts -------------------------------------


def test_yoochoose_clicks_dat(tmp_path: Path) -> None:
    path = tmp_path / "yoochoose-clicks.dat"
    path.write_text(
        "1,2014-04-07T10:51:09.277Z,214536502,0\n"
        "1,2014-04-07T10:54:09.868Z,214536500,0\n"
        "1,2014-04-07T10:54:46.998Z,214536506,0\n"
        "1,2014-04-07T10:57:00.306Z,214577561,0\n"
        "2,2014-04-07T13:56:37.614Z,214662742,0\n"
        "2,2014-04-07T13:57:19.373Z,214662742,S\n"
        "3,2014-04-02T13:17:46Z,214716935,2053\n"
    )
    events = events_of(format="yoochoose", path=path)
    check_canonical(events)
    assert events[SESSION].to_list() == [1, 1, 1, 1, 2, 2, 3]
    assert events[ITEM].to_list()[:2] == [214536502, 214536500]
    assert events[TIME][0] == datetime(2014, 4, 7, 10, 51, 9, 277000, tzinfo=UTC)
    assert events[TIME][6] == utc(2014, 4, 2, 13, 17, 46)  # no fraction is fine too


def test_yoochoose_with_a_header_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "clicks.dat"
    path.write_text("SessionId,Timestamp,ItemId,Category\n1,2014-04-07T10:51:09.277Z,5,0\n")
    with pytest.raises(RecsysError, match=r"clicks.dat: column 'SessionId'.*'SessionId' on line 1"):
        events_of(format="yoochoose", path=path)


RETAILROCKET = """timestamp,visitorid,event,itemid,transactionid
{t0},257597,view,355908,
{t10},257597,view,248676,
{t55},257597,addtocart,248676,
{t100},257597,view,318965,
{t161},257597,view,253185,
{t161},257597,transaction,253185,4000
{t5},992329,view,248676,
{t20},992329,view,355908,
{t90},992329,view,111016,
"""


def test_retailrocket_sessionises_on_all_events_then_keeps_views(tmp_path: Path) -> None:
    t0 = ms(utc(2015, 6, 2, 5, 2, 12)) + 117
    offsets = {f"t{m}": t0 + m * 60_000 for m in (0, 5, 10, 20, 55, 90, 100, 161)}
    path = tmp_path / "events.csv"
    path.write_text(RETAILROCKET.format(**offsets))
    events = events_of(format="retailrocket", path=path)
    check_canonical(events)
    # Visitor 257597: views at 0, 10 and 100 min are one session, because the add-to-cart at
    # 55 min bridges the 90-minute gap between views; the view at 161 min is 61 min later.
    # Visitor 992329: 5, 20 min; then 70 min of silence.
    assert sessions_of(events) == [
        [355908, 248676, 318965],
        [248676, 355908],
        [111016],
        [253185],
    ]
    assert events.height == 7  # the add-to-cart and the transaction are not views
    assert ms(events.filter(pl.col(ITEM) == 318965)[TIME][0]) == t0 + 100 * 60_000
    assert events[SESSION].n_unique() == 4


def test_retailrocket_gap_is_configurable(tmp_path: Path) -> None:
    t0 = ms(utc(2015, 6, 2))
    offsets = {f"t{m}": t0 + m * 60_000 for m in (0, 5, 10, 20, 55, 90, 100, 161)}
    path = tmp_path / "events.csv"
    path.write_text(RETAILROCKET.format(**offsets))
    events = events_of(format="retailrocket", path=path, session_gap_minutes=30)
    assert sessions_of(events)[:2] == [[355908, 248676], [248676, 355908]]


REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
)


def rees46_row(time: str, event: str, product: int, user: int) -> str:
    return (
        f"{time} UTC,{event},{product},2053013555631882655,electronics.smartphone,apple,"
        f"489.07,{user},4d3b30da-a5e4-49df-b1a8-ba5943f1dd33\n"
    )


def test_rees46_views_per_user_cut_at_an_hour_across_monthly_files(tmp_path: Path) -> None:
    october = tmp_path / "2019-Oct.csv"
    october.write_text(
        REES46_HEADER
        + rees46_row("2019-10-01 00:00:00", "view", 44600062, 541312140)
        + rees46_row("2019-10-01 00:00:05", "cart", 44600062, 541312140)
        + rees46_row("2019-10-01 00:20:00", "view", 3900821, 541312140)
        + rees46_row("2019-10-01 01:20:01", "view", 17200506, 541312140)
        + rees46_row("2019-10-31 23:30:00", "view", 1307067, 554748717)
        + rees46_row("2019-10-31 23:40:00", "purchase", 1307067, 554748717)
    )
    november = tmp_path / "2019-Nov.csv"
    november.write_text(
        REES46_HEADER
        + rees46_row("2019-11-01 00:10:00", "view", 1004237, 554748717)
        + rees46_row("2019-11-01 00:00:00", "view", 26300086, 541312140)
        + ",,,,,,,,\n"  # an empty row: nulls, dropped later as missing values
    )
    events = events_of(format="rees46", path=[october, november])
    check_canonical(events)
    assert events.drop_nulls().height == 6  # views only
    # User 541312140: 00:00 and 00:20 together, 01:20:01 is 60 min 1 s later: a new session,
    # then November 1st is a month later. User 554748717's session crosses the two files.
    assert sorted(sessions_of(events.drop_nulls())) == sorted(
        [[44600062, 3900821], [17200506], [1307067, 1004237], [26300086]]
    )
    assert events[SESSION].drop_nulls().n_unique() == 4  # ids unique across the files
    assert events.filter(pl.col(ITEM) == 17200506)[TIME][0] == utc(2019, 10, 1, 1, 20, 1)


def test_rees46_bad_time_names_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "2019-Oct.csv"
    path.write_text(
        REES46_HEADER
        + rees46_row("2019-10-01 00:00:00", "cart", 1, 2)  # not a view: filtered before parsing
        + rees46_row("2019-10-01 00:00:00", "view", 1, 2)
        + rees46_row("2019-10-01T00:01:00", "view", 1, 2)
    )
    with pytest.raises(RecsysError, match=r"'event_time'.*'2019-10-01T00:01:00 UTC' on line 4"):
        events_of(format="rees46", path=path)


COVEO_HEADER = (
    "session_id_hash,event_type,product_action,product_sku_hash,server_timestamp_epoch_ms,"
    "hashed_url\n"
)


def test_coveo_detail_views_split_again_at_long_gaps(tmp_path: Path) -> None:
    t0 = 1550885210881
    minute = 60_000
    s1 = "00000477031dd4e1ab3ba3b7dae4a6bb3bd2ac0cdce3a2b5e38b48d9d6c01f48"
    s2 = "0000157d5d5447f1c3a5dc0e0d4ce42bfd61ea6c4a3c9c1cf4b89f6ac1c2d6ce"
    sku_a, sku_b, sku_c, sku_d = (f"{c * 8}{'f' * 56}" for c in "abcd")
    url = "803f57c2a4a7a5a3b6b0c5ecd2f3a31a6e1c7e8f4a1b1c3d4e5f60718293a4b5"
    path = tmp_path / "browsing_train.csv"
    path.write_text(
        COVEO_HEADER
        + f"{s1},event_product,detail,{sku_a},{t0},{url}\n"
        + f"{s1},pageview,,,{t0 + minute},{url}\n"
        + f"{s1},event_product,detail,{sku_b},{t0 + 5 * minute},{url}\n"
        + f"{s1},event_product,add,{sku_b},{t0 + 6 * minute},{url}\n"
        + f"{s1},event_product,detail,{sku_c},{t0 + 125 * minute},{url}\n"
        + f"{s2},event_product,purchase,{sku_d},{t0 + 2 * minute},{url}\n"
        + f"{s2},event_product,detail,{sku_d},{t0 + 3 * minute},{url}\n"
        + f"{s2},event_product,detail,{sku_a},{t0 + 4 * minute},{url}\n"
    )
    events = events_of(format="coveo", path=path)
    check_canonical(events)
    assert events.schema[ITEM] == pl.String
    assert sessions_of(events) == [[sku_a, sku_b], [sku_d, sku_a], [sku_c]]
    assert ms(events.filter(pl.col(ITEM) == sku_c)[TIME][0]) == t0 + 125 * minute


def test_table_csv_with_a_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text(
        "user_session,sku,ts,price\nu1,A-1,1700000000000,3.5\nu1,A-2,1700000060000,1\n"
        "u2,A-1,1700000000500,2\n"
    )
    columns = {"session_id": "user_session", "item_id": "sku", "timestamp": "ts"}
    events = events_of(format="table", path=path, columns=columns, timestamp_unit="ms")
    check_canonical(events)
    assert events.schema[ITEM] == pl.String and events.schema[SESSION] == pl.String
    assert events[ITEM].to_list() == ["A-1", "A-2", "A-1"]
    assert ms(events[TIME][2]) == 1700000000500


def test_table_tsv_with_datetime_text_and_integer_ids(tmp_path: Path) -> None:
    path = tmp_path / "clicks.tsv"
    path.write_text("sid\titem\twhen\n7\t101\t2024-01-31T12:00:00\n7\t102\t2024-01-31T12:00:30\n")
    columns = {"session_id": "sid", "item_id": "item", "timestamp": "when"}
    events = events_of(format="table", path=path, columns=columns, timestamp_unit="datetime")
    assert events.schema[ITEM] == pl.Int64 and events.schema[SESSION] == pl.Int64
    assert events[TIME].to_list() == [utc(2024, 1, 31, 12), utc(2024, 1, 31, 12, 0, 30)]


def test_table_parquet_times_of_every_kind_become_utc(tmp_path: Path) -> None:
    local = [datetime(2024, 5, 1, 12, 0), datetime(2024, 5, 1, 12, 1)]
    frame = pl.DataFrame({"s": [1, 1], "i": pl.Series([10, 11], dtype=pl.Int32), "t": local})
    columns = {"session_id": "s", "item_id": "i", "timestamp": "t"}
    naive = tmp_path / "naive.parquet"
    frame.write_parquet(naive)
    events = events_of(format="table", path=naive, columns=columns)
    assert events[TIME][0] == utc(2024, 5, 1, 12) and events.schema[ITEM] == pl.Int64
    berlin = tmp_path / "berlin.parquet"
    frame.with_columns(pl.col("t").dt.replace_time_zone("Europe/Berlin")).write_parquet(berlin)
    assert events_of(format="table", path=berlin, columns=columns)[TIME][0] == utc(2024, 5, 1, 10)
    epoch = tmp_path / "epoch.parquet"
    frame.with_columns(pl.Series("t", [1714564800.25, 1714564860.0])).write_parquet(epoch)
    got = events_of(format="table", path=epoch, columns=columns, timestamp_unit="s")
    assert ms(got[TIME][0]) == 1714564800250
    text = tmp_path / "text.parquet"
    frame.with_columns(pl.Series("t", ["2024-05-01 12:00:00", "soon"])).write_parquet(text)
    with pytest.raises(RecsysError, match=r"text.parquet: column 't'.*found 'soon' on row 2"):
        events_of(format="table", path=text, columns=columns)


def test_files_with_integer_and_text_ids_are_read_as_text(tmp_path: Path) -> None:
    columns = {"session_id": "s", "item_id": "i", "timestamp": "t"}
    (tmp_path / "a.csv").write_text("s,i,t\n1,10,1700000100\n1,11,1700000160\n")
    (tmp_path / "b.csv").write_text("s,i,t\n2,x10,1700000200\n2,x11,1700000260\n")
    events = events_of(
        format="table", path=[tmp_path / "a.csv", tmp_path / "b.csv"], columns=columns
    )
    assert events.schema[ITEM] == pl.String
    assert events[ITEM].to_list() == ["10", "11", "x10", "x11"]


# --- problems in files, named precisely (the CLI shows these same messages) -----------------


def tsv(tmp_path: Path, body: str, name: str = "clicks.tsv") -> Path:
    path = tmp_path / name
    path.write_text("SessionId\tItemId\tTime\n" + body)
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "1\t5\t1396437466.94\n1\t6\tnan\n",
            r"column 'Time': expected a number of epoch seconds, found 'nan' on line 3",
        ),
        ("1\t5\t1396437466\n1\t6\tyesterday\n", r"column 'Time'.*'yesterday' on line 3"),
        ("1\t5\t1396437466\n1.5\t6\t1396437467\n", r"column 'SessionId'.*found '1.5' on line 3"),
        (
            "1\t5\t1396437466\n1\t6\t1396437467\t99\n",
            r"line 3 has 4 tab-separated fields, expected 3",
        ),
        ('1\t5\t1396437466\n1\t6\t"139\n', r"line 3 has an unbalanced quote"),
    ],
)
def test_bad_rows_name_the_column_or_line(tmp_path: Path, body: str, expected: str) -> None:
    path = tsv(tmp_path, body)
    with pytest.raises(RecsysError, match=rf"^{path}: .*{expected}"):
        events_of(format="gru4rec_tsv", path=path)


def test_bad_split_value_in_srgnn_tsv(tmp_path: Path) -> None:
    path = tmp_path / "sessions.tsv"
    path.write_text("session_id\tposition\titem_id\tsplit\n1\t0\t5\ttrain\n1\t1\t6\tvalid\n")
    with pytest.raises(RecsysError, match=r"column 'split': expected 'train' or 'test'.*line 3"):
        events_of(format="srgnn_tsv", path=path)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "clicks.parquet"
    path.write_text("s,i,t\n1,2,3\n")
    columns = {"session_id": "s", "item_id": "i", "timestamp": "t"}
    with pytest.raises(RecsysError, match=r"clicks.parquet: not a readable Parquet file"):
        events_of(format="table", path=path, columns=columns)


def test_table_mapping_to_absent_columns(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("sid,item,ts\n1,2,3\n")
    columns = {"session_id": "session", "item_id": "item", "timestamp": "ts"}
    with pytest.raises(RecsysError, match=r"missing column\(s\) \['session'\].*found \['sid'"):
        events_of(format="table", path=path, columns=columns)


def test_compressed_downloads_are_named(tmp_path: Path) -> None:
    path = tmp_path / "events.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(RecsysError, match=r"events.csv.gz: a compressed archive; unpack it"):
        events_of(format="retailrocket", path=path)


def test_a_missing_column_is_named_with_what_was_found(tmp_path: Path) -> None:
    path = tmp_path / "clicks.tsv"
    path.write_text("SessionId\tItemId\n1\t10\n")
    with pytest.raises(
        RecsysError, match=r"missing column\(s\) \['Time'\].*found \['SessionId', 'ItemId'\]"
    ):
        events_of(format="gru4rec_tsv", path=path)


def test_epoch_numbers_in_the_wrong_unit_are_caught(tmp_path: Path) -> None:
    columns = {"session_id": "s", "item_id": "i", "timestamp": "t"}
    path = tmp_path / "clicks.csv"
    path.write_text("s,i,t\n1,10,1700000000000\n1,11,1700000060000\n")  # ms, read as s
    with pytest.raises(
        RecsysError, match=r"clicks.csv: column 't': read as epoch s.*timestamp_unit"
    ):
        events_of(format="table", path=path, columns=columns)
    parquet = tmp_path / "clicks.parquet"
    pl.DataFrame({"s": [1], "i": [10], "t": [1700000000]}).write_parquet(parquet)
    with pytest.raises(
        RecsysError, match=r"'t' holds numbers .* but .*timestamp_unit is 'datetime'"
    ):
        events_of(format="table", path=parquet, columns=columns, timestamp_unit="datetime")
