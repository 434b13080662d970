"""Model roll-over on the live service's worker: sessions replayed between batches, in rounds,
and swapped at once; the worker keeps answering and finishes even when it is never idle."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from recsys.config import ModelConfig
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.serving.live_batcher import Click, MicroBatcher, Migrate, Read
from recsys.serving.live_migrate import FINAL_STALE, MIGRATE_CHUNK, Migration
from recsys.serving.live_store import KeptSession, SessionStore, replay_states
from recsys.serving.recommender import SessionRecommender
from tests.helpers import assert_same

N_ITEMS = 60
IDS = list(range(1000, 1000 + N_ITEMS))


def _model(tmp_path: Path, layers: list[int], seed: int) -> SessionRecommender:
    network = GRU4Rec(N_ITEMS, ModelConfig.model_validate({"layers": layers}), seed=seed)
    path = tmp_path / f"model-{seed}.pt"
    TrainedModel(network, ItemIndex.of(IDS, [float(i % 7) for i in IDS])).save(path)
    return SessionRecommender.load(path)


def _held(store: SessionStore[KeptSession], sessions: int, clicks: int) -> None:
    now = store.clock()
    for s in range(sessions):
        session = store.get_or_start(f"s{s}", now)
        for t in range(clicks):
            store.keep(session, IDS[(s * 5 + t * 3) % N_ITEMS], (s * 5 + t * 3) % N_ITEMS)


def _assert_on(new: SessionRecommender, store: SessionStore[KeptSession], prefix: str = "") -> None:
    """Every held session's (of ids starting with ``prefix``) state and indices are those of
    replaying its kept ids into ``new``."""
    for sid, session in store.items():
        if not str(sid).startswith(prefix):
            continue
        seen = new.to_indices(list(session.clicks))[0]
        (expected,) = replay_states(new.model, [seen])
        assert session.seen == seen, sid
        assert expected is not None and session.state is not None, sid
        assert torch.allclose(session.state, expected, atol=1e-6), sid


def test_sessions_clicked_after_their_replay_are_replayed_in_another_round(
    tmp_path: Path,
) -> None:
    new = _model(tmp_path, [24, 8], seed=2)
    store: SessionStore[KeptSession] = SessionStore()
    _held(store, sessions=3 * MIGRATE_CHUNK, clicks=3)
    migration = Migration(new, "v2", Future(), store)
    while len(migration.done) < MIGRATE_CHUNK:  # the first chunk replayed, one step at a time
        assert not migration.advance(store)
    replayed = list(migration.done)
    now = store.clock()
    for sid in replayed[: FINAL_STALE + 4]:  # more than the swap replays: another round
        store.keep(store.get(sid, now), IDS[7], 7)
        migration.clicked.add(sid)
    store.drop(replayed[-1])  # ended and restarted under its id, as many clicks as before:
    restarted = store.get_or_start(replayed[-1], now)  # only its identity tells it apart
    for _ in range(3):
        store.keep(restarted, IDS[11], 11)
    while not migration.advance(store):
        pass
    outcome = migration.apply(store)
    assert outcome["rounds"] == 2 and outcome["replayed_at_swap"] == 1, outcome  # the restart
    _assert_on(new, store)
    assert restarted.seen == [11, 11, 11]  # not the replay of the session it replaced


def test_the_worker_finishes_a_roll_over_while_never_idle_and_answers_meanwhile(
    tmp_path: Path,
) -> None:
    old, new = _model(tmp_path, [16], seed=1), _model(tmp_path, [24, 8], seed=2)
    store: SessionStore[KeptSession] = SessionStore()
    _held(store, sessions=8 * MIGRATE_CHUNK, clicks=6)
    batcher = MicroBatcher(old, store, max_batch=8)
    outstanding: list[Future] = []
    answered = 0
    try:
        swap = batcher.submit(Migrate(new, "v2"))
        deadline = time.monotonic() + 60
        n = 0
        while not swap.done() and time.monotonic() < deadline:  # at least 200 queued clicks
            still = [f for f in outstanding if not f.done()]
            answered += sum(f.result() is not None for f in outstanding if f.done())
            outstanding = still
            while len(outstanding) < 200:
                outstanding.append(
                    batcher.submit(Click(f"busy{n % 40}", IDS[n % N_ITEMS], 5, False))
                )
                n += 1
            time.sleep(0.001)
        assert swap.done(), "the roll-over did not finish while the worker was busy"
        outcome = swap.result()
        assert outcome["replayed"] >= 8 * MIGRATE_CHUNK and answered > 0, outcome
        for future in outstanding:
            future.result(30)
        assert batcher.rec is new and batcher.label == "v2" and batcher.swaps == 1
        read = batcher.call(Read("s3", 5, False))
        assert_same(read, new.recommend(list(store.peek("s3", store.clock()).clicks), k=5), 1e-5)
    finally:
        batcher.close()
    _assert_on(new, store, prefix="s")  # (the busy ones may have more clicks than are kept)


def test_a_second_roll_over_while_one_is_in_progress_is_refused(tmp_path: Path) -> None:
    old, new = _model(tmp_path, [16], seed=1), _model(tmp_path, [24, 8], seed=2)
    store: SessionStore[KeptSession] = SessionStore()
    _held(store, sessions=4 * MIGRATE_CHUNK, clicks=50)
    batcher = MicroBatcher(old, store)
    try:
        first, second = batcher.submit(Migrate(new, "v2")), batcher.submit(Migrate(new, "v3"))
        with pytest.raises(Exception, match="already in progress"):
            second.result(30)
        assert first.result(60)["replayed"] == 4 * MIGRATE_CHUNK
        assert batcher.label == "v2"
    finally:
        batcher.close()


def test_a_swap_that_fails_keeps_the_old_model_and_every_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recsys.serving.live_migrate as live_migrate

    def broken(*args: object) -> None:
        raise RuntimeError("replay failed")

    old, new = _model(tmp_path, [16], seed=1), _model(tmp_path, [24, 8], seed=2)
    store: SessionStore[KeptSession] = SessionStore()
    batcher = MicroBatcher(old, store)
    try:
        for s in range(2 * MIGRATE_CHUNK):  # sessions clicked on the old model
            for t in range(3):
                batcher.call(Click(f"s{s}", IDS[(s * 5 + t * 3) % N_ITEMS], 5, False))
        before = {sid: (s.state.clone(), list(s.seen)) for sid, s in store.items()}
        monkeypatch.setattr(live_migrate, "replay_states", broken)  # fails inside the swap
        with pytest.raises(RuntimeError, match="replay failed"):
            batcher.call(Migrate(new, "v2"), timeout=60)
        assert batcher.rec is old and batcher.swaps == 0
        for sid, session in store.items():
            assert torch.equal(session.state, before[sid][0]) and session.seen == before[sid][1]
        answer = batcher.call(Read("s1", 5, False))
        clicks = list(store.peek("s1", store.clock()).clicks)
        assert_same(answer, old.recommend(clicks, k=5), 1e-5)
    finally:
        batcher.close()
