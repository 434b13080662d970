"""The scoring library on a model trained on a real log: rankings, unknown ids, live sessions.

The model is a small GRU4Rec trained for a few hundred steps on the RSC15 100k sample; what is
checked does not depend on its quality, only that serving ranks exactly as the evaluation does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys.core.errors import RecsysError
from recsys.data.preparation import PreparedDataset
from recsys.data.schema import ITEM
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.model.artifact import TrainedModel
from recsys.ranking import GEMV_ROWS
from recsys.serving.recommender import LiveSessions, Recommendation, SessionRecommender
from tests.helpers import assert_same, real_sessions


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as served: on a busy 2-core machine a second one only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rec(trained: tuple[PreparedDataset, Path]) -> SessionRecommender:
    return SessionRecommender.load(trained[1])


@pytest.fixture(scope="module")
def sessions(trained: tuple[PreparedDataset, Path]) -> list[list[int]]:
    return real_sessions(trained[0], 25)


# A live click computes layer 0's input gates for one click (a matrix-vector product), a re-run
# for the whole session in one matrix product; BLAS may sum in another order, so the two agree
# to float rounding (~1e-6 on these scores), not always bit for bit.
LIVE_ATOL = 1e-5


# --- the library ranks exactly as the evaluation harness ----------------------------------------


def test_recommend_equals_the_evaluation_ranking(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path], sessions: list[list[int]]
) -> None:
    harness = GRU4RecScorer(rec.model)
    index = {item: i for i, item in enumerate(rec.item_ids)}
    prefixes = [s[: t + 1] for s in sessions for t in range(len(s) - 1)]
    assert len(prefixes) > 40
    for prefix in prefixes:
        got = rec.recommend(prefix, k=20)
        scores = harness.score_next([np.array([index[i] for i in prefix])])[0]
        values, idx = torch.topk(scores, 20)
        assert got.items == [rec.item_ids[i] for i in idx.tolist()]
        assert got.scores == values.tolist()
        assert got.unknown == [] and got.fallback is None
    # The batched call equals the harness's batched call too (same batch, same arithmetic).
    batch = rec.recommend_batch(prefixes, k=5)
    scores = harness.score_next([np.array([index[i] for i in p]) for p in prefixes])
    values, idx = torch.topk(scores, 5)
    assert [r.items for r in batch] == [[rec.item_ids[i] for i in row] for row in idx.tolist()]
    assert [r.scores for r in batch] == values.tolist()


def test_load_from_file_and_directory(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path], sessions: list[list[int]]
) -> None:
    path = trained[1]
    for source in (path, path.parent, str(path)):
        assert_same(
            SessionRecommender.load(source).recommend(sessions[0]), rec.recommend(sessions[0])
        )
    with pytest.raises(RecsysError, match="model file not found"):
        SessionRecommender.load(path.parent / "missing.pt")
    with pytest.raises(RecsysError, match="no model.pt"):
        SessionRecommender.load(path.parent.parent)


def test_unknown_ids_are_skipped_and_reported(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    a, b = sessions[0][:2]
    got = rec.recommend([123456789, a, "not-an-id", str(b), True, 2.5], k=10)
    assert_same(got, replace(rec.recommend([a, b], k=10), unknown=got.unknown))
    assert got.unknown == [123456789, "not-an-id", True, 2.5]
    # numpy scalars (what a DataFrame hands over) are plain ids
    assert rec.recommend(np.array([a, b]), k=10).items == got.items


def test_empty_or_all_unknown_session_gets_popular_items(
    rec: SessionRecommender, trained: tuple[PreparedDataset, Path]
) -> None:
    counts = trained[0].train.group_by(ITEM).len()
    count_of = dict(zip(counts[ITEM].to_list(), counts["len"].to_list(), strict=True))
    top = sorted(count_of.values(), reverse=True)[:15]
    for session, unknown in (([], []), ([-1, "x"], [-1, "x"])):
        got = rec.recommend(session, k=15)
        assert got.fallback == "popular"
        assert got.unknown == unknown
        assert got.scores == [float(c) for c in top]
        assert [count_of[i] for i in got.items] == top


def test_exclude_seen(rec: SessionRecommender, sessions: list[list[int]]) -> None:
    for session in sessions[:10]:
        seen = set(session)
        full = rec.recommend(session, k=20 + len(seen))
        got = rec.recommend(session, k=20, exclude_seen=True)
        assert not seen & set(got.items)
        expected = [(i, s) for i, s in zip(full.items, full.scores, strict=True) if i not in seen]
        assert list(zip(got.items, got.scores, strict=True)) == expected[:20]
    # k beyond the catalogue: every unseen item once, never a masked (-inf) one
    everything = rec.recommend(sessions[0], k=rec.n_items + 5, exclude_seen=True)
    assert len(everything.items) == rec.n_items - len(set(sessions[0]))
    assert all(np.isfinite(everything.scores))


def test_recommend_batch_mixes_sessions(rec: SessionRecommender, sessions: list[list[int]]) -> None:
    batch = [sessions[0], [], [42424242], sessions[1] + [-5], sessions[2][:1]]
    got = rec.recommend_batch(batch, k=8)
    assert len(got) == len(batch)
    for one, session in zip(got, batch, strict=True):
        # other batch shapes may change the float sums in the last bits
        assert_same(one, rec.recommend(session, k=8), atol=1e-4)
    assert [r.fallback for r in got] == [None, "popular", "popular", None, None]
    with pytest.raises(RecsysError, match="k must be a positive integer"):
        rec.recommend(sessions[0], k=0)


# --- the certified low-precision top-k ------------------------------------------------------------


@pytest.fixture(scope="module")
def fast(trained: tuple[PreparedDataset, Path]) -> SessionRecommender:
    """The same model with the fast top-k forced on (by default only for >= 8192 items)."""
    return SessionRecommender.load(trained[1], fast_top_k=True)


@pytest.mark.parametrize("rows", [1, 16])  # the int8 GEMV pass and the bf16 GEMM pass
def test_the_cheap_pass_bounds_every_exact_score(
    fast: SessionRecommender, sessions: list[list[int]], rows: int
) -> None:
    index = {item: i for i, item in enumerate(fast.item_ids)}
    prefixes = [np.array([index[i] for i in s[: t + 1]]) for s in sessions for t in range(len(s))]
    last = fast.model.last_outputs(prefixes)
    assert fast.ranker.uses_gemv(rows) == (rows <= GEMV_ROWS)
    tightest = float("inf")
    for start in range(0, len(prefixes), rows):
        output = last[start : start + rows]
        with torch.inference_mode():
            exact = torch.addmm(fast.model.item_bias, output, fast.model.item_out.t())
        upper = fast.ranker.upper_bounds(output)
        assert bool((upper >= exact).all())
        tightest = min(tightest, float((upper - exact).min()))
    # a bound that holds, yet not so loose that nothing could ever be certified
    assert tightest < 0.05 * float(last.norm(dim=1).max()) * fast.ranker.max_norm


def test_fast_top_k_equals_the_full_ranking(
    rec: SessionRecommender, fast: SessionRecommender, sessions: list[list[int]]
) -> None:
    assert not rec.fast_top_k  # 2,217 items: plain fp32 by default
    prefixes = [s[: t + 1] for s in sessions for t in range(len(s))]
    for prefix in prefixes:
        for exclude_seen in (False, True):
            assert_same(
                fast.recommend(prefix, k=20, exclude_seen=exclude_seen),
                rec.recommend(prefix, k=20, exclude_seen=exclude_seen),
            )
    stats = fast.fast_stats
    assert stats["certified"] > 0.9 * (stats["certified"] + stats["fallback"])
    live = fast.live()
    for t, item in enumerate(sessions[0]):
        assert_same(
            live.click("s", item, k=20), rec.recommend(sessions[0][: t + 1], k=20), atol=LIVE_ATOL
        )


def test_new_weights_in_place_are_ranked_with_new_bounds(
    trained: tuple[PreparedDataset, Path], sessions: list[list[int]]
) -> None:
    """A reload or warm start changes the weights under a live recommender: its certified
    pass must not keep the old int8 bounds, which would certify a wrong top-k (items whose
    scores rose would never become candidates)."""
    served = TrainedModel.load(trained[1])
    fast = SessionRecommender(served, fast_top_k=True)
    before = fast.recommend(sessions[0], k=20)  # builds the cheap pass on the old weights
    index = {item: i for i, item in enumerate(fast.item_ids)}
    risen = [index[i] for i in fast.recommend(sessions[0], k=520).items[500:510]]
    changed = {k: v.clone() for k, v in served.network.state_dict().items()}
    best = index[before.items[0]]
    scale = torch.linspace(2.0, 3.0, len(risen)).unsqueeze(1)  # distinct scores, no ties
    changed["item_out"][risen] = scale * changed["item_out"][best].clone()
    changed["item_bias"][risen] = changed["item_bias"][best].clone()
    served.network.load_state_dict(changed)
    plain = SessionRecommender(TrainedModel(served.network, served.items), fast_top_k=False)
    expected = plain.recommend(sessions[0], k=20)
    assert {index[i] for i in expected.items[:10]} == set(risen)  # the change matters
    assert_same(fast.recommend(sessions[0], k=20), expected)


def test_fast_top_k_falls_back_when_it_cannot_certify(
    trained: tuple[PreparedDataset, Path], sessions: list[list[int]]
) -> None:
    """Items with one shared vector tie everywhere: nothing can be certified, fp32 answers."""
    loaded = TrainedModel.load(trained[1])
    with torch.no_grad():
        loaded.network.item_out[:] = loaded.network.item_out[0]
        loaded.network.item_bias.zero_()
    fast = SessionRecommender(loaded, fast_top_k=True)
    plain = SessionRecommender(loaded, fast_top_k=False)
    assert_same(fast.recommend(sessions[0], k=10), plain.recommend(sessions[0], k=10))
    assert fast.fast_stats == {"certified": 0, "fallback": 1}


# --- live sessions ------------------------------------------------------------------------------


def test_live_click_equals_rerunning_the_session(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    live = rec.live(capacity=1000)
    history: dict[int, list[Any]] = {}
    longest = max(len(s) for s in sessions)
    for t in range(longest):  # round-robin, so many states live side by side
        for sid, session in enumerate(sessions):
            if t >= len(session):
                continue
            history.setdefault(sid, []).append(session[t])
            assert_same(
                live.click(sid, session[t], k=10), rec.recommend(history[sid], k=10), atol=LIVE_ATOL
            )
            if t == 1:
                assert_same(
                    live.click(sid, session[t - 1], k=10, exclude_seen=True),
                    rec.recommend(history[sid] + [session[t - 1]], k=10, exclude_seen=True),
                    atol=LIVE_ATOL,
                )
                history[sid].append(session[t - 1])
    assert len(live) == len(sessions)


def test_live_unknown_clicks_keep_the_state(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    live = rec.live()
    first = live.click("s", "no-such-item")
    assert first.fallback == "popular" and first.unknown == ["no-such-item"]
    a, b = sessions[3][:2]
    live.click("s", a)
    got = live.click("s", 987654321, k=5)
    assert_same(got, replace(rec.recommend([a], k=5), unknown=[987654321]))
    assert_same(live.click("s", b, k=5), rec.recommend([a, b], k=5), atol=LIVE_ATOL)


def test_live_capacity_evicts_the_least_recently_used(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    live = rec.live(capacity=3)
    a, b, c, d = (s[0] for s in sessions[:4])
    live.click("s1", a)
    live.click("s2", b)
    live.click("s3", c)
    live.click("s1", b)  # s1 is now the most recent; s2 the least
    live.click("s4", d)
    assert len(live) == 3 and live.evicted == 1
    assert "s2" not in live and all(s in live for s in ("s1", "s3", "s4"))
    assert_same(live.click("s1", c, k=5), rec.recommend([a, b, c], k=5), atol=LIVE_ATOL)
    assert_same(live.click("s2", d, k=5), rec.recommend([d], k=5))  # starts afresh
    live.end("s3")
    assert "s3" not in live


def test_live_ttl_forgets_idle_sessions(rec: SessionRecommender, sessions: list[list[int]]) -> None:
    now = [0.0]
    live = LiveSessions(rec, capacity=100, ttl_seconds=10.0, clock=lambda: now[0])
    a, b, c = sessions[0][:3]
    live.click("idle", a)
    live.click("busy", a)
    for t in (4.0, 8.0):  # clicks within the TTL keep "busy" alive
        now[0] = t
        live.click("busy", b)
    now[0] = 11.0
    assert "idle" not in live and "busy" in live  # idle for 11 s > 10 s
    assert live.expire() == 1 and len(live) == 1
    for t in (12.0, 16.0):
        now[0] = t
        live.click("busy", b)
    assert_same(live.click("busy", c, k=5), rec.recommend([a, b, b, b, b, c], k=5), atol=LIVE_ATOL)
    now[0] = 30.0  # "busy" idle for 14 s: its next click starts a new session
    assert_same(live.click("busy", c, k=5), rec.recommend([c], k=5), atol=LIVE_ATOL)
    assert live.evicted == 2


def test_live_sessions_from_several_threads(
    rec: SessionRecommender, sessions: list[list[int]]
) -> None:
    live = rec.live()
    results: dict[int, list[Recommendation]] = {}

    def user(sid: int) -> None:
        results[sid] = [live.click(sid, item, k=5) for item in sessions[sid]]

    threads = [threading.Thread(target=user, args=(sid,)) for sid in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for sid in range(8):
        for t, got in enumerate(results[sid]):
            assert_same(got, rec.recommend(sessions[sid][: t + 1], k=5), atol=LIVE_ATOL)
