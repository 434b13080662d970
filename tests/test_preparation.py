"""The preparation protocol (DESIGN §2): real logs, hand-made cases, and properties.

The property tests compare ``prepare_events`` with a plain-Python transcription of the protocol
on generated logs, row for row and in order, and check the invariants every number rests on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.prepare import is_up_to_date, prepare
from recsys.config import Config, PreparationConfig, config_from_dict, load_config
from recsys.core.errors import RecsysError
from recsys.data.preparation import (
    PreparedDataset,
    data_fingerprint,
    load_prepared,
    order_by_session_start,
    prepare_events,
)
from recsys.data.schema import ITEM, ITEM_IDX, SESSION, SPLIT, SPLITS, STATS_FILE, TIME, TIME_DTYPE
from recsys.data.sources import read_events
from recsys.data.splits import session_order
from tests.conftest import ROOT, shared_path

T0 = datetime(2024, 3, 1, tzinfo=UTC)
Row = tuple[Any, Any, int]  # session, item, epoch ms


def frame(rows: list[tuple[Any, Any, float]]) -> pl.LazyFrame:
    """Canonical events from (session, item, hours after T0) rows, in the given order."""
    return pl.DataFrame(
        {
            SESSION: [r[0] for r in rows],
            ITEM: [r[1] for r in rows],
            TIME: [T0 + timedelta(hours=r[2]) for r in rows],
        },
        schema={SESSION: pl.Int64, ITEM: pl.Int64, TIME: TIME_DTYPE},
    ).lazy()


def rows_of(events: pl.DataFrame) -> list[Row]:
    times = events[TIME].dt.epoch("ms").to_list()
    return list(zip(events[SESSION].to_list(), events[ITEM].to_list(), times, strict=True))


def sessions(events: pl.DataFrame) -> dict[Any, list[Any]]:
    return {s: g[ITEM].to_list() for (s,), g in events.group_by(SESSION, maintain_order=True)}


# --- a transcription of DESIGN §2 in plain Python, for the comparisons ---------------------


def reference(rows: list[Row], prep: PreparationConfig) -> dict[str, list[Row]]:
    """The protocol, one readable loop per step (rows: session, item, ms; in file order)."""
    n = prep.min_session_length

    def drop_short(ev: list[Row]) -> list[Row]:
        length = Counter(e[0] for e in ev)
        return [e for e in ev if length[e[0]] >= n]

    def ordered(ev: list[Row]) -> list[Row]:
        start: dict[Any, int] = {}
        for s, _, t in ev:
            start[s] = min(t, start.get(s, t))
        return sorted(ev, key=lambda e: (start[e[0]], e[0], e[2]))

    def split(ev: list[Row], t_split: int) -> tuple[list[Row], list[Row]]:
        start: dict[Any, int] = {}
        for s, _, t in ev:
            start[s] = min(t, start.get(s, t))
        train = drop_short([e for e in ev if e[2] < t_split])
        known = {e[1] for e in train}
        test = drop_short([e for e in ev if start[e[0]] >= t_split and e[1] in known])
        return train, test

    ev = sorted(rows, key=lambda e: (e[0], e[2]))  # stable: ties keep file order
    if prep.dedup_consecutive:
        ev = [e for k, e in enumerate(ev) if k == 0 or ev[k - 1][:2] != e[:2]]
    while True:
        before = len(ev)
        ev = drop_short(ev)
        support = Counter(e[1] for e in ev)
        ev = drop_short([e for e in ev if support[e[1]] >= prep.min_item_support])
        if len(ev) == before or not prep.iterate_filters:
            break
    if not ev:  # everything filtered away: nothing to split
        return {name: [] for name in SPLITS}
    day = 86_400_000
    t_split = max(e[2] for e in ev) - round(prep.test_days * day)
    train, test = split(ev, t_split)
    train_tr, valid = split(train, t_split - round(prep.test_days * day))
    return {
        "train": ordered(train),
        "test": ordered(test),
        "train_tr": ordered(train_tr),
        "valid": ordered(valid),
    }


# --- generated logs ----------------------------------------------------------------------


@st.composite
def click_logs(draw: st.DrawFn) -> list[Row]:
    """Sessions over ~4 days, skewed items, repeats, ties, and sessions that cross the split."""
    n_sessions = draw(st.integers(8, 40))
    rows: list[Row] = []
    for s in range(n_sessions):
        start = draw(st.integers(0, 4 * 24 * 60))  # minutes
        length = draw(st.integers(1, 7))
        gaps = draw(st.lists(st.sampled_from([0, 1, 5, 30, 600]), min_size=length, max_size=length))
        items = draw(
            st.lists(
                st.integers(0, 11).map(lambda i: 100 + i * i),  # low ids are the popular ones
                min_size=length,
                max_size=length,
            )
        )
        minute = start
        for gap, item in zip(gaps, items, strict=True):
            minute += gap
            rows.append((s, item, minute))
    # Shuffle rows as a raw log would be; ties within a session keep this order.
    order = draw(st.permutations(range(len(rows))))
    return [(rows[k][0], rows[k][1], ms_of(rows[k][2])) for k in order]


def ms_of(minute: int) -> int:
    return int(T0.timestamp() * 1000) + minute * 60_000


def to_frame(rows: list[Row]) -> pl.LazyFrame:
    return pl.DataFrame(
        {
            SESSION: [r[0] for r in rows],
            ITEM: [r[1] for r in rows],
            TIME: pl.Series([r[2] for r in rows], dtype=pl.Int64).cast(TIME_DTYPE),
        }
    ).lazy()


preparations = st.builds(
    PreparationConfig,
    dedup_consecutive=st.booleans(),
    iterate_filters=st.booleans(),
    min_item_support=st.integers(1, 3),
    min_session_length=st.integers(1, 3),
    test_days=st.sampled_from([0.5, 1.0, 1.5]),
)

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def prepared_or_none(rows: list[Row], prep: PreparationConfig) -> PreparedDataset | None:
    """The dataset, or None when the protocol leaves nothing to test (said with a clear error)."""
    try:
        data = prepare_events(to_frame(rows), prep, "generated")
        event("prepared")
        if data.stats["dropped"].get("train_events_at_or_after_split"):
            event("a session crosses the split")
        return data
    except RecsysError as err:
        event("nothing left to split")
        assert any(
            phrase in str(err)
            for phrase in ("filtered away", "train split is empty", "test split is empty")
        ), err
        return None


@PROPERTY
@given(click_logs(), preparations)
def test_matches_the_protocol_transcription(rows: list[Row], prep: PreparationConfig) -> None:
    data = prepared_or_none(rows, prep)
    expected = reference(rows, prep)
    if data is None:
        assert not expected["train"] or not expected["test"]
        return
    for name in SPLITS:
        assert rows_of(data.split(name)) == expected[name], name


@PROPERTY
@given(click_logs(), preparations)
def test_protocol_invariants(rows: list[Row], prep: PreparationConfig) -> None:
    data = prepared_or_none(rows, prep)
    if data is None:
        return
    t_split = datetime.fromisoformat(data.stats["split"]["t_split"])
    t_valid = datetime.fromisoformat(data.stats["split"]["t_split_valid"])
    # No training event at or after the split time; test sessions start at or after it.
    assert data.train[TIME].max() < t_split
    if data.train_tr.height:
        assert data.train_tr[TIME].max() < t_valid
    if data.valid.height:
        assert data.valid[TIME].max() < t_split
        assert data.valid.group_by(SESSION).agg(pl.col(TIME).min())[TIME].min() >= t_valid
    assert data.test.group_by(SESSION).agg(pl.col(TIME).min())[TIME].min() >= t_split
    # Every evaluated item is known to the model that is evaluated on it.
    assert set(data.test[ITEM]) <= set(data.train[ITEM])
    assert set(data.valid[ITEM]) <= set(data.train_tr[ITEM])
    # Sessions are long enough everywhere; each is contiguous and in time order.
    for name in SPLITS:
        split = data.split(name)
        if split.height == 0:
            continue
        assert split.group_by(SESSION).len()["len"].min() >= prep.min_session_length, name
        assert split.equals(order_by_session_start(split)), name
        assert split[SESSION].rle_id().max() + 1 == split[SESSION].n_unique(), name
    # The item index: contiguous 0..n-1 over train items, the same mapping in every split.
    assert data.items[ITEM_IDX].to_list() == list(range(data.n_items))
    assert set(data.items[ITEM]) == set(data.train[ITEM])
    mapping = dict(zip(data.items[ITEM], data.items[ITEM_IDX], strict=True))
    for name in SPLITS:
        split = data.split(name)
        assert [mapping[i] for i in split[ITEM]] == split[ITEM_IDX].to_list()
    # Train events are a subset of the raw log; stats agree with the frames.
    assert Counter(rows_of(data.train)) <= Counter(rows)
    for name in SPLITS:
        assert data.stats["splits"][name]["events"] == data.split(name).height
    assert data.stats["test_predictions"] == data.test.height - data.test[SESSION].n_unique()
    for name in ("test", "valid"):
        assert (data.stats["repeat_targets"][name], data.stats["last_item_targets"][name]) == (
            repeat_shares_by_hand(sessions(data.split(name)).values())
        ), name


def repeat_shares_by_hand(clicks: Iterable[list[Any]]) -> tuple[float, float]:
    """Of the next-item targets, the shares already in the prefix and equal to the last click."""
    targets = seen = last = 0
    for items in clicks:
        for i in range(1, len(items)):
            targets += 1
            seen += items[i] in items[:i]
            last += items[i] == items[i - 1]
    return (round(seen / targets, 4), round(last / targets, 4)) if targets else (0.0, 0.0)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(click_logs())
def test_rerun_gives_byte_identical_files(
    tmp_path_factory: pytest.TempPathFactory, rows: list[Row]
) -> None:
    tmp = tmp_path_factory.mktemp("rerun")
    log = tmp / "log.parquet"
    to_frame(rows).collect().rename({SESSION: "s", ITEM: "i", TIME: "t"}).write_parquet(log)
    raw = {
        "name": "rerun",
        "workdir": str(tmp / "a"),
        "data": {
            "source": {
                "format": "table",
                "path": str(log),
                "columns": {"session_id": "s", "item_id": "i", "timestamp": "t"},
            },
            "preparation": {"min_item_support": 1, "min_session_length": 2},
        },
    }
    first = config_from_dict(raw)
    try:
        prepare(first)
    except RecsysError:
        return  # nothing left to split; covered by the tests above
    before = snapshot(first.prepared_dir)
    prepare(first, force=True)
    assert snapshot(first.prepared_dir) == before
    elsewhere = config_from_dict(raw | {"workdir": str(tmp / "b")})
    prepare(elsewhere)
    assert snapshot(elsewhere.prepared_dir) == before
    assert json.loads(before[STATS_FILE])["fingerprint"] == data_fingerprint(first.prepared_dir)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- the steps on hand-made logs ---------------------------------------------------------


def prep(**kwargs: Any) -> PreparationConfig:
    return PreparationConfig(**{"min_item_support": 1, **kwargs})


def test_consecutive_repeats_collapse_only_when_asked() -> None:
    rows = [(1, 5, 0), (1, 5, 0.1), (1, 6, 0.2), (1, 5, 0.3), (2, 5, 0.5), (2, 6, 0.6)]
    rows += [(3, 5, 30), (3, 6, 30.1), (3, 6, 30.2)]
    kept = prepare_events(frame(rows), prep(dedup_consecutive=False), "t")
    deduped = prepare_events(frame(rows), prep(dedup_consecutive=True), "t")
    assert sessions(kept.train)[1] == [5, 5, 6, 5]
    assert sessions(deduped.train)[1] == [5, 6, 5]
    assert sessions(kept.test) == {3: [5, 6, 6]} and sessions(deduped.test) == {3: [5, 6]}
    assert deduped.stats["dropped"]["consecutive_repeats"] == 2


def test_stats_give_the_share_of_targets_already_in_the_session() -> None:
    # t_max = 60.4 h: test from 36.4 h, valid from 12.4 h; consecutive repeats kept.
    rows = [(1, 5, 0), (1, 6, 0.1), (1, 7, 0.2), (1, 8, 0.3)]
    rows += [(2, 5, 20), (2, 6, 20.1), (2, 5, 20.2), (2, 7, 20.3), (2, 5, 20.4)]
    rows += [(3, 5, 40), (3, 5, 40.1), (3, 6, 40.2), (3, 5, 40.3)]
    rows += [(4, 7, 60), (4, 8, 60.1), (4, 7, 60.2), (4, 7, 60.3), (4, 8, 60.4)]
    data = prepare_events(frame(rows), prep(dedup_consecutive=False), "t")
    assert sessions(data.valid) == {2: [5, 6, 5, 7, 5]}
    assert sessions(data.test) == {3: [5, 5, 6, 5], 4: [7, 8, 7, 7, 8]}
    # valid: 6 5 7 5 -> two of four in the prefix, none the last click.
    # test: 5 6 5 | 8 7 7 8 -> five of seven in the prefix, two the last click (5 5, 7 7).
    assert data.stats["repeat_targets"] == {"test": round(5 / 7, 4), "valid": 0.5}
    assert data.stats["last_item_targets"] == {"test": round(2 / 7, 4), "valid": 0.0}


def test_filters_repeat_until_nothing_changes() -> None:
    # Item 9 (support 1) goes; session 2 is left with one click and goes; that takes item 7
    # below the minimum support of 3, which one pass does not look at again. Iterating drops
    # item 7, then sessions 3 and 6, then finds nothing more: three rounds.
    rows = [(1, 5, 0), (1, 6, 0.1), (4, 5, 1), (4, 6, 1.1), (5, 5, 2), (5, 6, 2.1)]
    rows += [(2, 7, 3), (2, 9, 3.1), (3, 7, 4), (3, 5, 4.1), (6, 7, 5), (6, 6, 5.1)]
    rows += [(7, 5, 30), (7, 6, 30.1), (8, 6, 30.2), (8, 5, 30.3)]
    once = prepare_events(frame(rows), prep(min_item_support=3, iterate_filters=False), "t")
    fixed = prepare_events(frame(rows), prep(min_item_support=3, iterate_filters=True), "t")
    assert len(once.stats["dropped"]["filter_rounds"]) == 1
    assert len(fixed.stats["dropped"]["filter_rounds"]) == 3
    assert set(fixed.train[ITEM]) == {5, 6}
    assert 7 in set(once.train[ITEM])


def test_a_session_crossing_the_split_keeps_its_early_part_in_train() -> None:
    # t_max = 48 h, test_days = 1: the split is at 24 h.
    rows = [(1, 5, 0), (1, 6, 1), (2, 5, 23), (2, 6, 23.5), (2, 7, 24.5), (2, 8, 25)]
    rows += [(3, 5, 24), (3, 6, 25), (3, 9, 26), (4, 6, 47), (4, 5, 48)]
    data = prepare_events(frame(rows), prep(), "t")
    assert data.stats["split"]["t_split"] == str(T0 + timedelta(hours=24))
    assert sessions(data.train) == {1: [5, 6], 2: [5, 6]}
    # Session 3 starts exactly at the split: test. Item 9 is unknown to train: dropped.
    assert sessions(data.test) == {3: [5, 6], 4: [6, 5]}
    assert data.stats["dropped"]["train_events_at_or_after_split"] == 2
    assert data.stats["dropped"]["test_unknown_items"] == 1


def test_fixed_split_time_in_another_zone_is_converted_to_utc() -> None:
    rows = [(1, 5, 0), (1, 6, 1), (2, 5, 10), (2, 6, 11), (3, 6, 30), (3, 5, 31)]
    split = (T0 + timedelta(hours=12)).astimezone().isoformat()  # local zone of the machine
    data = prepare_events(frame(rows), prep(split_time="2024-03-01T14:00:00+02:00"), "t")
    assert data.stats["split"]["t_split"] == str(T0 + timedelta(hours=12))
    assert sessions(data.test) == {3: [6, 5]}
    assert prepare_events(frame(rows), prep(split_time=split), "t").stats == data.stats


def test_valid_window_ends_where_test_begins() -> None:
    rows = [(1, 5, 0), (1, 6, 1), (2, 5, 30), (2, 6, 31), (3, 6, 60), (3, 5, 61)]
    data = prepare_events(frame(rows), prep(test_days=1.0), "t")
    assert data.stats["split"]["t_split"] == str(T0 + timedelta(hours=37))
    assert data.stats["split"]["t_split_valid"] == str(T0 + timedelta(hours=13))
    assert sessions(data.train_tr) == {1: [5, 6]} and sessions(data.valid) == {2: [5, 6]}


def test_missing_values_are_dropped_and_counted() -> None:
    events = pl.DataFrame(
        {
            SESSION: [1, 1, None, 2, 2, 3, 3],
            ITEM: [5, 6, 5, None, 6, 5, 6],
            TIME: [T0, T0 + timedelta(hours=1), T0, T0, T0, T0 + timedelta(days=2), None],
        },
        schema={SESSION: pl.Int64, ITEM: pl.Int64, TIME: TIME_DTYPE},
    )
    events = pl.concat([events, frame([(4, 5, 50), (4, 6, 50.5)]).collect()])
    data = prepare_events(events.lazy(), prep(), "t")
    assert data.stats["dropped"]["missing_values"] == 3
    assert sessions(data.train) == {1: [5, 6]}


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([], {}, "no events to prepare"),
        ([(1, 5, 0), (2, 6, 1)], {}, "every event was filtered away"),
        ([(1, 5, 0), (1, 6, 1)], {}, "the train split is empty"),
        ([(1, 5, 0), (1, 6, 1), (2, 7, 40), (2, 8, 41)], {}, "the test split is empty"),
        ([(1, 5, 0), (1, 6, 1)], {"split": "given"}, "has no split column"),
    ],
)
def test_nothing_to_prepare_is_explained(rows: list, kwargs: dict, message: str) -> None:
    with pytest.raises(RecsysError, match=f"^my-log: .*{message}"):
        prepare_events(frame(rows), prep(**kwargs), "my-log")


def test_session_order_is_by_start_then_id() -> None:
    data = frame([(9, 5, 2), (9, 6, 3), (3, 5, 2), (4, 7, 1), (4, 8, 5)]).collect()
    assert session_order(data)[SESSION].to_list() == [4, 3, 9]
    assert order_by_session_start(data)[SESSION].to_list() == [4, 4, 3, 9, 9]


# --- real logs through their configs -----------------------------------------------------


def config_here(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """A project config, read from the repository root, writing into tmp_path."""
    monkeypatch.chdir(ROOT)
    return load_config(f"configs/{name}.yaml", {"workdir": str(tmp_path)})


def test_diginetica_reproduces_the_published_srgnn_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_path("diginetica", "diginetica_sessions.tsv")
    config = config_here("diginetica", tmp_path, monkeypatch)
    stats, redone = prepare(config)
    assert redone
    data = load_prepared(config.prepared_dir)
    assert (data.train.height, data.train[SESSION].n_unique()) == (906_140, 186_670)
    assert (data.test.height, data.test[SESSION].n_unique()) == (76_821, 15_963)
    assert data.n_items == 43_097 and stats["items"] == 43_097
    assert stats["test_predictions"] == 60_858
    # The repeat shares quoted for this split: 20.5 % already in the prefix, 9.1 % the last click.
    assert stats["repeat_targets"]["test"] == 0.2051
    assert stats["last_item_targets"]["test"] == 0.0914
    assert data.test[ITEM].n_unique() == 21_131
    # Upstream order is kept: train sessions in date order = file order.
    assert data.train[SESSION].unique(maintain_order=True).is_sorted()
    assert data.test[SESSION].min() > data.train[SESSION].max()
    # train_tr / valid: the last 8% of train sessions, valid restricted to train_tr items.
    assert data.train_tr.height + data.valid.height <= data.train.height
    assert data.valid[SESSION].min() > data.train_tr[SESSION].max()
    assert set(data.valid[ITEM]) <= set(data.train_tr[ITEM])
    assert stats["timestamps"] is False and "time_min" not in stats["splits"]["train"]
    # The given split cannot be re-split by time (its times are made up).
    events = read_events(config.data.source)
    with pytest.raises(RecsysError, match="no real timestamps.*use split: given"):
        prepare_events(events, PreparationConfig(split="time"), "diginetica")


def test_rsc15_sample_split_by_session_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_file = shared_path("yoochoose-rsc15-100k", "yoochoose-clicks-100k_test.txt")
    config = config_here("yoochoose-100k", tmp_path, monkeypatch)
    stats, _ = prepare(config)
    data = load_prepared(config.prepared_dir)
    # The upstream split (by session end, the last day) is ours too, up to the sessions that
    # started before our split time: every one of our test sessions is an upstream test one.
    upstream_test = set(pl.read_csv(test_file, separator="\t")["SessionId"])
    ours = set(data.test[SESSION])
    assert ours <= upstream_test and len(ours) >= 0.99 * len(upstream_test)
    assert stats["dropped"]["consecutive_repeats"] == 0  # RSC15 keeps repeats
    assert len(stats["dropped"]["filter_rounds"]) == 1  # and filters once
    assert stats["split"]["t_split"] == "2014-04-07 00:50:01.534000+00:00"
    assert data.train[TIME].max() < datetime(2014, 4, 7, 0, 50, 1, 534000, tzinfo=UTC)
    assert stats["splits"]["test"]["events"] == data.test.height > 13_000
    assert 17_000 < data.train[SESSION].n_unique() <= 17_794
    assert set(data.test[ITEM]) <= set(data.train[ITEM])


def test_diginetica_raw_sample_through_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_path("diginetica-sample", "sample_train-item-views.csv")
    config = config_here("diginetica-sample", tmp_path, monkeypatch)
    stats, _ = prepare(config)
    data = load_prepared(config.prepared_dir)
    assert stats["counts"]["raw_events"] == 12_391
    assert stats["dropped"]["consecutive_repeats"] > 0
    assert len(stats["dropped"]["filter_rounds"]) > 2  # the sample needs several rounds
    # Split 7 days before the last event left after filtering (a test event here).
    t_split = datetime.fromisoformat(stats["split"]["t_split"])
    assert t_split == data.test[TIME].max() - timedelta(days=7)
    assert data.items.height == stats["items"] > 50
    assert data.test.height > 0 and set(data.test[ITEM]) <= set(data.train[ITEM])
    assert SPLIT not in data.train.columns


def test_up_to_date_until_the_source_or_the_config_changes(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    rows = [(1, 5, 0), (1, 6, 1), (2, 5, 2), (2, 6, 3), (3, 6, 30), (3, 5, 31)]
    text = "".join(f"{s}\t{i}\t{T0.timestamp() + h * 3600}\n" for s, i, h in rows)
    log.write_text("SessionId\tItemId\tTime\n" + text)
    raw = {
        "name": "u",
        "workdir": str(tmp_path),
        "data": {
            "source": {"format": "gru4rec_tsv", "path": str(log)},
            "preparation": {"min_item_support": 1},
        },
    }
    config = config_from_dict(raw)
    assert not is_up_to_date(config)
    stats, redone = prepare(config)
    assert redone and "seconds" in stats  # timing is returned, never written
    assert "seconds" not in json.loads((config.prepared_dir / STATS_FILE).read_text())
    assert is_up_to_date(config) and prepare(config)[1] is False
    raw["data"]["preparation"]["test_days"] = 0.5
    assert not is_up_to_date(config_from_dict(raw))
    log.write_text(log.read_text() + "4\t5\t1709300000\n")
    assert not is_up_to_date(config)
    (config.prepared_dir / "items.parquet").unlink()
    with pytest.raises(RecsysError, match="missing items.parquet.*recsys prepare"):
        load_prepared(config.prepared_dir)
