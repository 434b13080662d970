"""Behaviour of the session-based baselines on tiny logs whose right answers are known by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import (
    BASELINE_KINDS,
    BASELINE_PARAMS,
    ItemKNNParams,
    SequentialRulesParams,
    STANParams,
    VSKNNParams,
    default_baselines,
)
from recsys.core.errors import RecsysError
from recsys.data.schema import ITEM_IDX, SESSION, TIME, TIME_DTYPE
from recsys.evaluation.baselines import (
    BASELINES,
    STAN,
    VSKNN,
    ItemKNN,
    Pop,
    SequentialRules,
    SPop,
    make_baseline,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def log(sessions: list[list[int]], days: list[float] | None = None) -> pl.DataFrame:
    """Train frame in the interface layout; session s starts days[s] days (else s hours) after T0."""
    rows = []
    for s, items in enumerate(sessions):
        start = T0 + (timedelta(days=days[s]) if days is not None else timedelta(hours=s))
        rows += [(s + 100, item, start + timedelta(minutes=p)) for p, item in enumerate(items)]
    frame = pl.DataFrame(
        rows, schema={SESSION: pl.Int64, ITEM_IDX: pl.Int64, TIME: TIME_DTYPE}, orient="row"
    )
    return frame.sort(TIME, maintain_order=True)


def arr(*items: int) -> np.ndarray:
    return np.array(items, dtype=np.int64)


def ranking(scores: torch.Tensor) -> list[int]:
    """Items from best to worst; a stable sort keeps ties visible as index order."""
    return torch.argsort(scores, descending=True, stable=True).tolist()


def random_sessions(seed: int = 0, n_sessions: int = 60, n_items: int = 25) -> list[list[int]]:
    """Zipf-popular items, 2-8 clicks per session, repeats included."""
    rng = np.random.default_rng(seed)
    return [
        (rng.zipf(1.6, size=int(rng.integers(2, 9))).clip(max=n_items) - 1).tolist()
        for _ in range(n_sessions)
    ]


def random_log(seed: int = 0) -> pl.DataFrame:
    return log(random_sessions(seed))


def test_pop_scores_are_train_click_counts() -> None:
    model = Pop(5).fit(log([[0, 1, 1], [1, 2], [2, 1, 3]]))
    scores = model.score_next([arr(4), arr(0, 3)])
    assert scores.dtype == torch.float32 and scores.shape == (2, 5)
    assert scores[0].tolist() == [1.0, 4.0, 2.0, 1.0, 0.0]
    assert torch.equal(scores[0], scores[1])


def test_spop_prefers_items_repeated_in_the_prefix_then_popular_ones() -> None:
    model = SPop(5).fit(log([[0, 1, 1], [1, 2], [2, 1, 3]]))
    scores = model.score_next([arr(3, 0, 3)])[0]
    # 3 twice in the prefix, 0 once; then by popularity 1 (4 clicks) > 2 (2) > 4 (never clicked)
    assert ranking(scores) == [3, 0, 1, 2, 4]


def test_iknn_ranks_the_most_co_occurring_item_first_and_uses_only_the_last_item() -> None:
    train = log([[0, 1], [1, 0, 5], [0, 1], [0, 2], [2, 6], [3, 4], [3, 4], [3, 4], [4, 3]])
    model = ItemKNN(7).fit(train)
    scores = model.score_next([arr(0), arr(3, 0)])
    assert torch.equal(scores[0], scores[1])
    # 1 shares 3 sessions with 0, then 5 and 2 one each (5 is rarer, so more similar); the
    # unrelated but popular 3 and 4 have no evidence and come after every co-occurring item.
    assert ranking(scores[0])[:3] == [1, 5, 2]
    assert min(scores[0, [1, 5, 2]]) > max(scores[0, [0, 3, 4, 6]])


def test_iknn_similarity_is_regularised_cosine() -> None:
    train = log([[0, 1], [0, 1], [0, 2], [1, 3]])
    scores = (
        ItemKNN(4, ItemKNNParams(lmbd=2.0, alpha=0.5)).fit(train).score_next([arr(0)])[0].double()
    )
    # co(0,1)=2, supp 0=3, supp 1=3; co(0,2)=1, supp 2=1 -> sims 2/5 and 1/sqrt(15)
    expected = (1 / np.sqrt(5 * 3)) / (2 / 5)
    assert scores[2] / scores[1] == pytest.approx(expected, rel=1e-3)
    pruned = ItemKNN(4, ItemKNNParams(n_sims=1)).fit(train).score_next([arr(0)])[0]
    assert pruned[2] == pruned[3] < pruned[1]  # 2 lost its evidence: same fallback as 3


def test_sr_recommends_the_item_that_followed_most_often() -> None:
    train = log([[0, 1], [0, 1], [0, 2], [7, 0, 3], [2, 2, 2, 2, 2]])
    scores = SequentialRules(8).fit(train).score_next([arr(5, 0)])[0]
    assert ranking(scores)[0] == 1
    # 2 is the most popular item overall but follows 0 only once: it ties with 3 on the rule
    # weight and wins that tie by popularity; 7 (before 0) and 0 itself get no rule.
    assert ranking(scores)[:3] == [1, 2, 3]
    assert min(scores[[1, 2, 3]]) > max(scores[[0, 4, 5, 6, 7]])


def test_sr_weights_by_distance_and_prunes() -> None:
    train = log([[0, 1, 2], [3]])
    scores = SequentialRules(4).fit(train).score_next([arr(0)])[0].double()
    assert scores[1].item() == pytest.approx(1.0, abs=1e-4)
    assert scores[2].item() == pytest.approx(0.5, abs=1e-4)
    for params in ({"steps": 1}, {"pruning": 1}):
        pruned = (
            SequentialRules(4, SequentialRulesParams(**params)).fit(train).score_next([arr(0)])[0]
        )
        assert pruned[2] == pruned[3] < pruned[1]  # 2 lost its rule: same fallback as 3


def knn_log() -> pl.DataFrame:
    # A matches both prefix items, B only the older one, C nothing; 9 is popular but unrelated.
    a, b, c = [0, 1, 7], [0, 8], [9, 10]
    return log([a, b] + [c] * 5)


@pytest.mark.parametrize("kind", ["vsknn", "stan"])
def test_session_knn_ranks_items_of_the_most_similar_session_first(kind: str) -> None:
    model = make_baseline(kind, 12, {}).fit(knn_log())
    scores = model.score_next([arr(0, 1)])[0]
    assert ranking(scores)[:4] == [0, 1, 7, 8] or ranking(scores)[:4] == [1, 0, 7, 8]
    # items of no neighbour come after every neighbour item, popular 9 included
    assert scores[8] > max(scores[[2, 3, 4, 5, 6, 9, 10, 11]])
    assert scores[9] > scores[2]  # popularity orders the items without evidence


def test_vsknn_scores_follow_the_paper_formula() -> None:
    scores = VSKNN(12).fit(knn_log()).score_next([arr(0, 1)])[0].double()
    # sim(A) = (1/2 + 1) / 2 with decay 1; sim(B) = (1/2) / 2 with decay 1/2 (matched 2 clicks back)
    assert (scores[8] / scores[7]).item() == pytest.approx((0.25 * 0.5) / 0.75, rel=1e-3)
    assert (scores[0] / scores[7]).item() == pytest.approx((0.75 + 0.125) / 0.75, rel=1e-3)


def test_session_knn_sampling_keeps_the_most_recent_candidates_and_k_the_most_similar() -> None:
    train = log([[0, 1, 7], [0, 8], [9, 10]], days=[0.0, 1.0, 2.0])  # B is more recent than A
    prefix = [arr(0, 1)]
    recent_only = VSKNN(12, VSKNNParams(sample_size=1)).fit(train).score_next(prefix)[0]
    assert recent_only[8] > recent_only[7]
    nearest_only = VSKNN(12, VSKNNParams(k=1)).fit(train).score_next(prefix)[0]
    assert nearest_only[7] > nearest_only[8]


def test_stan_prefers_recent_neighbours_and_items_near_the_match() -> None:
    train = log([[0, 20], [0, 21], [5, 0, 11, 12, 13]], days=[0.0, 10.0, 1.0])
    scores = STAN(22, STANParams(lambda_snh=1.0)).fit(train).score_next([arr(0)])[0]
    assert scores[21] > scores[20]  # same content, more recent neighbour
    assert scores[11] > scores[12] > scores[13]  # closer to the matched item in the neighbour
    assert scores[5] == pytest.approx(scores[11].item(), rel=1e-3)  # distance 1 on either side
    no_recency = STAN(22, STANParams(lambda_snh=None)).fit(train).score_next([arr(0)])[0]
    assert no_recency[21] == pytest.approx(no_recency[20].item(), rel=1e-3)


def test_stan_anchors_item_distances_at_the_latest_shared_item_of_the_neighbour() -> None:
    scores = STAN(6).fit(log([[0, 2, 3, 1, 4]])).score_next([arr(0, 1)])[0]
    # shared items 0 (position 1) and 1 (position 4): distances are measured from position 4
    assert scores[3] == scores[4] > scores[2]


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_score_sessions_equals_stacked_score_next(kind: str) -> None:
    model = make_baseline(kind, 25, {}).fit(random_log())
    sessions = [arr(3, 1, 1, 0), arr(7, 2), arr(0, 24, 5, 5, 9)]
    expected = torch.cat(
        [model.score_next([s[: t + 1]]) for s in sessions for t in range(len(s) - 1)]
    )
    assert torch.equal(model.score_sessions(sessions), expected)


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_scores_do_not_depend_on_the_batch_split(kind: str) -> None:
    model = make_baseline(kind, 25, {}).fit(random_log(seed=1))
    rng = np.random.default_rng(2)
    prefixes = [rng.integers(0, 25, size=int(rng.integers(1, 7))) for _ in range(40)]
    whole = model.score_next(prefixes)
    assert whole.shape == (40, 25) and whole.dtype == torch.float32
    assert torch.isfinite(whole).all()
    parts = torch.cat([model.score_next(prefixes[i : i + 7]) for i in range(0, 40, 7)])
    assert torch.equal(whole, parts)
    assert torch.equal(model.score_next(prefixes), whole)  # deterministic
    assert model.score_next([]).shape == (0, 25)


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_fit_does_not_mutate_the_input_frame(kind: str) -> None:
    train = random_log(seed=3)
    before = train.clone()
    make_baseline(kind, 25, {}).fit(train)
    assert train.equals(before) and train.schema == before.schema


def evidence(kind: str, sessions: list[list[int]], prefix: list[int]) -> set[int]:
    """Items each algorithm has any evidence for (no pruning or sampling at this size)."""
    last = prefix[-1]
    if kind == "iknn":
        return {j for s in sessions if last in s for j in s} - {last}
    if kind == "sr":
        return {
            s[q]
            for s in sessions
            for p in range(len(s))
            if s[p] == last
            for q in range(p + 1, min(len(s), p + 11))
        }
    return {j for s in sessions if set(s) & set(prefix) for j in s}


@pytest.mark.parametrize("kind", ["iknn", "sr", "vsknn", "stan"])
def test_items_with_evidence_beat_all_others_which_follow_popularity(kind: str) -> None:
    sessions = random_sessions(seed=4)
    params = {"pruning": 0} if kind == "sr" else {}
    model = make_baseline(kind, 25, params).fit(log(sessions))
    clicks = np.bincount([i for s in sessions for i in s], minlength=25)
    prefixes = [[i] for i in range(25)] + [[2, 0, 1], [1, 1, 3], [24]]
    scores = model.score_next([np.array(p) for p in prefixes])
    n_checked = 0
    for row, prefix in zip(scores, prefixes, strict=True):
        good = sorted(evidence(kind, sessions, prefix))
        rest = sorted(set(range(25)) - set(good))
        if good and rest:
            assert row[good].min() > row[rest].max()
            n_checked += 1
        by_pop = sorted(rest, key=lambda i: clicks[i])
        assert (torch.diff(row[by_pop]) >= 0).all()  # fallback ordered by popularity
        strictly = np.diff(clicks[by_pop]) > 0
        assert (torch.diff(row[by_pop])[torch.from_numpy(strictly)] > 0).all()
    assert n_checked > 5


def test_make_baseline_builds_every_kind_with_published_defaults() -> None:
    assert set(BASELINES) == {"pop", "spop", "iknn", "vsknn", "stan", "sr"}
    # one list of kinds: the config's, which also names the default baselines, in its order
    assert tuple(BASELINES) == BASELINE_KINDS == tuple(default_baselines())

    def defaults(kind: str) -> dict[str, object]:
        return BASELINE_PARAMS[kind]().model_dump()

    assert defaults("pop") == defaults("spop") == {}
    assert defaults("iknn") == {"n_sims": 100, "lmbd": 20.0, "alpha": 0.5}
    assert defaults("sr") == {"steps": 10, "weighting": "div", "pruning": 20}
    assert defaults("vsknn") == {
        "k": 100,
        "sample_size": 500,
        "weighting": "div",
        "weighting_score": "div",
    }
    stan = defaults("stan")
    assert (stan["k"], stan["sample_size"]) == (500, 5000)
    assert (stan["lambda_spw"], stan["lambda_snh"], stan["lambda_inh"]) == (1.02, 5.0, 2.05)
    for kind, cls in BASELINES.items():
        model = make_baseline(kind, 10)
        assert type(model) is cls and model.params == BASELINE_PARAMS[kind]()
    model = make_baseline("vsknn", 10, {"k": 5})
    assert isinstance(model, VSKNN) and model.params.k == 5 and model.n_items == 10
    assert make_baseline("stan", 10, STANParams(k=7)).params.k == 7


def test_make_baseline_rejects_unknown_kinds_and_parameters_clearly() -> None:
    with pytest.raises(RecsysError, match=r"unknown baseline kind 'knn'.*iknn"):
        make_baseline("knn", 10, {})
    with pytest.raises(
        RecsysError, match=r"(?s)'stan'.*unknown parameter\(s\) \['lambda'\].*lambda_inh"
    ):
        make_baseline("stan", 10, {"lambda": 1.0})
    with pytest.raises(RecsysError, match=r"(?s)'pop'.*unknown parameter\(s\) \['k'\].*none"):
        make_baseline("pop", 10, {"k": 3})
    with pytest.raises(RecsysError, match=r"(?s)'vsknn'.*params\.k: .*greater than or equal to 1"):
        make_baseline("vsknn", 10, {"k": 0})
    with pytest.raises(
        RecsysError, match=r"(?s)'sr'.*params\.weighting: .*'div', 'same' or 'quadratic'"
    ):
        make_baseline("sr", 10, {"weighting": "log"})
    with pytest.raises(RecsysError, match=r"(?s)'stan'.*params: .*instance of STANParams"):
        make_baseline("stan", 10, VSKNNParams())  # typed parameters of another kind


@pytest.mark.parametrize(
    ("kind", "params", "key"),
    [
        ("iknn", {"n_sims": 0}, "n_sims"),
        ("iknn", {"n_sims": 2.0}, "n_sims"),
        ("iknn", {"n_sims": True}, "n_sims"),
        ("iknn", {"lmbd": -0.1}, "lmbd"),
        ("iknn", {"lmbd": float("inf")}, "lmbd"),
        ("iknn", {"alpha": 1.5}, "alpha"),
        ("iknn", {"alpha": True}, "alpha"),
        ("sr", {"steps": 0}, "steps"),
        ("sr", {"pruning": -1}, "pruning"),
        ("sr", {"pruning": False}, "pruning"),
        ("vsknn", {"sample_size": 0}, "sample_size"),
        ("vsknn", {"weighting_score": "quadratic"}, "weighting_score"),
        ("stan", {"lambda_spw": 0}, "lambda_spw"),
        ("stan", {"lambda_snh": -1.0}, "lambda_snh"),
        ("stan", {"lambda_inh": float("nan")}, "lambda_inh"),
    ],
)
def test_every_parameter_keeps_its_range(kind: str, params: dict[str, object], key: str) -> None:
    with pytest.raises(RecsysError, match=rf"params\.{key}: "):
        make_baseline(kind, 10, params)


def test_parameters_at_the_edges_of_their_ranges_are_accepted() -> None:
    edges = {
        "iknn": {"n_sims": 1, "lmbd": 0, "alpha": 1},
        "sr": {"steps": 1, "weighting": "quadratic", "pruning": 0},
        "vsknn": {"k": 1, "sample_size": 1, "weighting": "same", "weighting_score": "same"},
        "stan": {"lambda_spw": None, "lambda_snh": None, "lambda_inh": 1e-9},
    }
    for kind, params in edges.items():
        model = make_baseline(kind, 10, params)
        assert model.params.model_dump() | params == model.params.model_dump()
    assert make_baseline("iknn", 10, {"lmbd": 0}).params.lmbd == 0.0  # ints read as floats


def test_bad_inputs_raise_recsys_errors() -> None:
    model = SequentialRules(5)
    with pytest.raises(RecsysError, match="fit"):
        model.score_next([arr(1)])
    with pytest.raises(RecsysError, match="item_idx"):
        model.fit(log([[0, 7]]))
    model.fit(log([[0, 1]]))
    with pytest.raises(RecsysError, match="empty"):
        model.score_next([arr()])
    with pytest.raises(RecsysError, match="0..4"):
        model.score_next([arr(5)])
