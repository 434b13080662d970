"""The certified catalogue ranker: its answers are those of full fp32 scoring, on both passes."""

from __future__ import annotations

import pytest
import torch

from recsys.ranking import (
    GEMV_ROWS,
    INT4_TRIAL,
    CatalogueRanker,
    prefix_items,
    rank_scores,
    ranker_for,
    target_ranks,
)

N_ITEMS, K = 9000, 20
SUM_ATOL = 1e-5  # fp32 sums in another order: a few ulps of scores of magnitude ~5


# 100 units: torch's int8 kernel misreads an inner dimension that is not a multiple of 16
# (the ranker pads it); 48: one that it handles as is.
@pytest.fixture(scope="module", params=[48, 100])
def catalogue(request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered item vectors (like trained embeddings), a popularity-like bias, and exact
    duplicates of some items so that ties happen."""
    dim = request.param
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(60, dim, generator=gen)
    weights = centres[torch.randint(0, 60, (N_ITEMS,), generator=gen)]
    weights = 0.4 * weights + 0.25 * torch.randn(N_ITEMS, dim, generator=gen)
    weights[100:150] = weights[200:250]  # 50 pairs of identical items
    bias = 0.2 * torch.randn(N_ITEMS, generator=gen)
    bias[100:150] = bias[200:250]
    return weights, bias


def outputs(weights: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Session outputs that point at some items, as a trained GRU's do."""
    gen = torch.Generator().manual_seed(seed)
    anchors = weights[torch.randint(0, N_ITEMS, (n,), generator=gen)]
    return torch.tanh(anchors + 0.3 * torch.randn(n, weights.shape[1], generator=gen))


def full(weights: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, out, weights.t())


# (rows, pass): one click goes through int4 then int8, up to GEMV_ROWS rows int8, more bf16
PASSES = [(1, "int4"), (1, "int8"), (GEMV_ROWS, "int8"), (64, "bf16")]


@pytest.mark.parametrize(("rows", "tier"), PASSES)
def test_upper_bounds_hold_for_every_item(
    catalogue: tuple[torch.Tensor, torch.Tensor], rows: int, tier: str
) -> None:
    weights, bias = catalogue
    ranker = CatalogueRanker(weights, bias)
    assert ranker.uses_gemv(rows) == (rows <= GEMV_ROWS)
    names = [t.name for t in ranker.tiers(rows)]
    assert tier in names
    for seed in range(5):
        out = outputs(weights, rows, seed)
        exact = full(weights, bias, out)
        upper = ranker.upper_bounds(out, names.index(tier))
        assert bool((upper >= exact).all())
        slack = upper - exact
        if tier == "int4":  # a scale per 64 weights: looser, well under knowing nothing
            trivial = out.norm(dim=1, keepdim=True) * ranker.max_norm + ranker.max_bias
            assert float((slack / trivial).median()) < 0.25
        else:  # tight enough to be useful: well inside the spread of the scores
            assert float(slack.max()) < 0.5 * float(exact.std())


def test_single_clicks_are_settled_by_the_int4_pass_with_the_fp32_answer(
    catalogue: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights, bias = catalogue
    ranker = CatalogueRanker(weights, bias)
    clicks = INT4_TRIAL + 20  # past the trial: a pass that certifies is kept
    out = outputs(weights, clicks, seed=31)
    scores = full(weights, bias, out)
    for i in range(clicks):
        got = ranker.top_k(out[i : i + 1], K)
        assert got.certified == 1
        top_values = torch.topk(scores[i], K).values
        torch.testing.assert_close(got.scores[0], top_values, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(scores[i, got.items[0]], top_values, rtol=0, atol=SUM_ATOL)
    assert ranker.tried["int4"] == clicks and ranker.settled["int4"] >= 0.9 * clicks
    assert ranker.tried["int8"] == clicks - ranker.settled["int4"]  # the rest went on to int8
    assert [t.name for t in ranker.tiers(1)][0] == "int4"


def test_a_strided_view_of_outputs_ranks_as_its_copy() -> None:
    """The weight-only kernels refuse non-contiguous input (at 64 units nothing is padded, so
    nothing copies it on the way); the ranker hands them a contiguous copy."""
    gen = torch.Generator().manual_seed(8)
    weights = torch.randn(60, 64, generator=gen)[torch.randint(0, 60, (N_ITEMS,), generator=gen)]
    weights = 0.4 * weights + 0.25 * torch.randn(N_ITEMS, 64, generator=gen)
    bias = 0.2 * torch.randn(N_ITEMS, generator=gen)
    ranker = CatalogueRanker(weights, bias)
    rows = outputs(weights, 3, seed=41)
    view = torch.cat((rows, rows)).t().contiguous().t()[:2]  # (2, H), column-major strides
    assert not view.is_contiguous()
    got = ranker.top_k(view, K)
    expected = ranker.top_k(view.contiguous(), K)
    assert torch.equal(got.items, expected.items) and torch.equal(got.scores, expected.scores)


def test_an_int4_pass_that_rarely_certifies_is_dropped(
    catalogue: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights, _ = catalogue
    same = weights[:1].expand(N_ITEMS, weights.shape[1]).contiguous()  # every item ties
    ranker = CatalogueRanker(same, torch.zeros(N_ITEMS))
    assert [t.name for t in ranker.tiers(1)] == ["int4", "int4", "int8"]  # +64, then +256
    out = outputs(weights, 1, seed=5)
    for _ in range(INT4_TRIAL):
        assert ranker.top_k(out, K).certified == 0  # nothing certifies: full fp32 each time
    assert [t.name for t in ranker.tiers(1)] == ["int8"]  # int4 only cost time here
    assert ranker.tried["int4"] == INT4_TRIAL and ranker.settled["int4"] == 0


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_top_k_and_ranks_equal_full_fp32(
    catalogue: tuple[torch.Tensor, torch.Tensor], rows: int, ties: str
) -> None:
    weights, bias = catalogue
    ranker = CatalogueRanker(weights, bias)
    out = outputs(weights, 256, seed=rows)
    scores = full(weights, bias, out)
    # targets: half inside the top 20 (some of them duplicated items, so tied), half anywhere
    gen = torch.Generator().manual_seed(3)
    inside = torch.topk(scores, K, dim=1).indices[torch.arange(256), torch.randint(0, K, (256,))]
    anywhere = torch.randint(0, N_ITEMS, (256,), generator=gen)
    targets = torch.where(torch.arange(256) % 2 == 0, inside, anywhere)
    expected_ranks = target_ranks(scores, targets, ties)
    certified = 0
    for start in range(0, 256, rows):
        part = slice(start, start + rows)
        got = ranker.top_k(out[part], K, targets=targets[part], ties=ties)
        assert got.ranks is not None
        certified += got.certified
        within = expected_ranks[part] <= K
        assert torch.equal(got.ranks[within], expected_ranks[part][within])
        assert bool((got.ranks[~within] > K).all())
        # Candidates are rescored by a batched product whose sums may round differently from
        # the full GEMM's in the last bit; the top-k is the same set of items.
        top_values = torch.topk(scores[part], K, dim=1).values
        torch.testing.assert_close(got.scores, top_values, rtol=0, atol=SUM_ATOL)
        torch.testing.assert_close(
            scores[part].gather(1, got.items), top_values, rtol=0, atol=SUM_ATOL
        )
    assert certified > 0.9 * 256  # the cheap pass settled the rows, not the fallback


@pytest.mark.parametrize("rows", [1, 64])
def test_excluded_items_are_never_returned(
    catalogue: tuple[torch.Tensor, torch.Tensor], rows: int
) -> None:
    weights, bias = catalogue
    ranker = CatalogueRanker(weights, bias)
    out = outputs(weights, rows, seed=11)
    scores = full(weights, bias, out)
    exclude = [torch.topk(scores[i], 5).indices.tolist() + [0, 1] for i in range(rows)]
    got = ranker.top_k(out, K, exclude=exclude)
    for i in range(rows):
        assert not set(got.items[i].tolist()) & set(exclude[i])
        masked = scores[i].clone()
        masked[exclude[i]] = float("-inf")
        torch.testing.assert_close(
            got.scores[i], torch.topk(masked, K).values, rtol=0, atol=SUM_ATOL
        )
    assert got.certified == rows


def test_a_catalogue_of_ties_falls_back_to_full_scoring(
    catalogue: tuple[torch.Tensor, torch.Tensor],
) -> None:
    weights, _ = catalogue
    same = weights[:1].expand(N_ITEMS, weights.shape[1]).contiguous()
    ranker = CatalogueRanker(same, torch.zeros(N_ITEMS))
    out = outputs(weights, 3, seed=5)
    got = ranker.top_k(out[:1], K, targets=torch.tensor([17]))
    assert got.certified == 0  # nothing can be certified when every item scores the same
    assert got.ranks is not None and int(got.ranks[0]) == K + 1  # conservative: all tie
    assert torch.equal(got.scores, full(same, torch.zeros(N_ITEMS), out[:1]).topk(K).values)


@pytest.mark.parametrize("rows", [2, 64])  # the int8 GEMV pass and the bf16 GEMM pass
@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_excluded_targets_are_misses_on_both_passes(
    catalogue: tuple[torch.Tensor, torch.Tensor], rows: int, ties: str
) -> None:
    """With exclusions (``exclude_seen``), the certified pass and full scoring agree on every
    rank, also when the target is itself excluded (it cannot be recommended: a miss)."""
    weights, bias = catalogue
    ranker = CatalogueRanker(weights, bias)
    out = outputs(weights, rows, seed=23)
    scores = full(weights, bias, out)
    top = torch.topk(scores, K, dim=1).indices
    exclude = [top[i, :3].tolist() for i in range(rows)]
    # even rows: the target is the best item, which is excluded; odd rows: the 5th best (kept)
    targets = torch.where(torch.arange(rows) % 2 == 0, top[:, 0], top[:, 4])
    got = ranker.top_k(out, K, exclude=exclude, targets=targets, ties=ties)
    reference = rank_scores(scores.clone(), K, exclude, targets, ties)
    assert got.ranks is not None and reference.ranks is not None
    assert torch.equal(got.ranks, reference.ranks)
    assert bool((got.ranks[::2] == K + 1).all())
    # 5th best with 3 better ones excluded: 2nd (3rd where its duplicate ties with it)
    assert bool((got.ranks[1::2] <= 3).all())
    # the same top-k (tied duplicates may come in another order), none of them excluded
    torch.testing.assert_close(got.scores, reference.scores, rtol=0, atol=SUM_ATOL)
    for i in range(rows):
        assert not set(got.items[i].tolist()) & set(exclude[i])
    assert got.certified == rows  # settled by the cheap pass, not by the fallback


def test_prefix_items_lists_each_prefix_once_session_major() -> None:
    import numpy as np

    sessions = [np.array([4, 5, 6]), np.array([7, 8])]
    assert prefix_items(sessions) == [[4], [4, 5], [7]]


@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_an_excluded_target_is_a_miss_even_in_a_catalogue_smaller_than_k(ties: str) -> None:
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.9, 0.5]])
    got = rank_scores(scores.clone(), 20, exclude=[[3, 1]], targets=torch.tensor([3]), ties=ties)
    assert got.ranks is not None and got.ranks.tolist() == [6.0]  # k (= 5 items) + 1
    kept = rank_scores(scores.clone(), 20, exclude=[[3, 1]], targets=torch.tensor([4]), ties=ties)
    assert kept.ranks is not None and kept.ranks.tolist() == [1.0]


def test_the_cached_ranker_follows_its_weights_through_a_replaced_data_tensor() -> None:
    """``param.data = ...`` keeps the object and its version: the cache must see the storage."""
    gen = torch.Generator().manual_seed(9)
    weights = torch.nn.Parameter(torch.randn(100, 8, generator=gen))
    bias, owner = torch.zeros(100), type("Owner", (), {})()
    first = ranker_for(weights, bias, owner)
    assert ranker_for(weights, bias, owner) is first  # unchanged weights: the same ranker
    weights.data = torch.randn(100, 8, generator=gen)
    second = ranker_for(weights, bias, owner)
    assert second is not first and torch.equal(second.weights, weights.detach())
