"""The compiled int4 catalogue pass (recsys/model/kernels_int4.cpp): its bounds hold for every
item on hard catalogues, its SIMD and portable paths agree, and a kernel that fails its
self-check is never used."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from recsys.model.kernels import ranking_kernels
from recsys.quantized import Int4Pass
from recsys.ranking import INT4_TRIAL, CatalogueRanker
from tests.conftest import skip_or_fail_in_ci


@pytest.fixture(scope="module")
def built() -> ModuleType:
    """The built module; without a C++ compiler the tests skip, except in CI, where they fail."""
    module = ranking_kernels()
    if module is None:
        skip_or_fail_in_ci("the compiled kernels could not be built")
    assert module is not None
    return module


@pytest.fixture(scope="module")
def kernels(built: ModuleType) -> SimpleNamespace:
    """The compiled pass, taken even where the CPU has no AVX-512 VNNI: there ``int4_upper``
    runs its portable path, so these tests check the same layout and bounds on every machine."""
    return SimpleNamespace(int4_vnni=lambda: True, int4_upper=built.int4_upper)


def test_the_simd_path_is_taken_exactly_where_the_cpu_has_vnni(built: ModuleType) -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert built.int4_vnni() == ({"avx512_vnni", "avx512bw"} <= flags)


def hard_catalogue(kind: str, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights that stress the quantiser: clustered, constant groups, large offsets, tiny and
    huge magnitudes."""
    gen = torch.Generator().manual_seed(n + dim)
    weights = 0.4 * torch.randn(40, dim, generator=gen)[torch.randint(0, 40, (n,), generator=gen)]
    weights += 0.25 * torch.randn(n, dim, generator=gen)
    if kind == "constant":  # every weight of an item equal: a zero-range group per item
        weights = weights[:, :1].expand(n, dim).contiguous()
    elif kind == "offset":  # groups far from zero, so zero-points carry most of the value
        weights += 30.0
    elif kind == "huge":
        weights *= 1e4
    elif kind == "tiny":
        weights *= 1e-4
    bias = 0.2 * torch.randn(n, generator=gen)
    return weights, bias


def rows_for(weights: torch.Tensor, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(count)
    picked = weights[torch.randint(0, len(weights), (count,), generator=gen)]
    out = torch.tanh(picked / picked.abs().amax().clamp_min(1e-30))
    out += 0.3 * torch.randn(count, weights.shape[1], generator=gen)
    out[0] = 0.0  # a silent session: x_q all zero
    out[1, 1:] = 0.0  # one unit carries everything: the int8 scale is set by it
    return out


@pytest.mark.parametrize("kind", ["clustered", "constant", "offset", "huge", "tiny"])
@pytest.mark.parametrize(("n", "dim"), [(9001, 48), (4099, 100), (2000, 512)])
def test_compiled_int4_bounds_hold_for_every_item(
    kernels: ModuleType, kind: str, n: int, dim: int
) -> None:
    weights, bias = hard_catalogue(kind, n, dim)
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), kernels)
    assert int4.ok and int4.native is not None
    out = rows_for(weights, 12)
    exact = torch.addmm(bias, out, weights.t())
    for start in (0, 2, 4, 10, 11):  # one row, pairs, and a pair's odd end
        rows = out[start : start + (1 if start in (0, 11) else 2)]
        for simd in (True, False):
            upper = int4.native_upper(rows, simd)
            assert bool((upper >= exact[start : start + len(rows)]).all())
    simd, portable = int4.native_upper(out), int4.native_upper(out, simd=False)
    scale = exact.abs().amax() + 1.0  # the same integer sums; fp32 steps may fuse differently
    assert float((simd - portable).abs().max()) <= 1e-5 * float(scale)


def test_compiled_int4_bounds_are_tighter_than_torch_kernels(kernels: SimpleNamespace) -> None:
    """No bf16 rounding of x or the output to cover: the slack shrinks (the reason it exists,
    besides speed)."""
    weights, bias = hard_catalogue("clustered", 9001, 100)
    norms = weights.norm(dim=1)
    compiled, torch_pass = Int4Pass(weights, bias, norms, kernels), Int4Pass(weights, bias, norms)
    assert compiled.native is not None and torch_pass.native is None
    out = rows_for(weights, 8)[2:]
    exact = torch.addmm(bias, out, weights.t())
    ours, theirs = compiled.upper(out) - exact, torch_pass.upper(out) - exact
    assert float(ours.mean()) < float(theirs.mean())


def test_a_compiled_kernel_that_fails_its_self_check_is_not_used(kernels: SimpleNamespace) -> None:
    weights, bias = hard_catalogue("clustered", 4099, 100)

    def low(*args: object) -> torch.Tensor:  # a broken kernel: 1 % short of its own bounds
        upper = kernels.int4_upper(*args)
        return upper - 0.01 * upper.abs()

    broken = SimpleNamespace(int4_vnni=lambda: True, int4_upper=low)
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), broken)
    assert int4.native is None and int4.ok  # torch's kernel instead
    out = rows_for(weights, 4)
    assert bool((int4.upper(out) >= torch.addmm(bias, out, weights.t())).all())


def test_the_ranker_with_the_compiled_pass_answers_as_full_fp32(kernels: SimpleNamespace) -> None:
    weights, bias = hard_catalogue("clustered", 9001, 100)
    ranker = CatalogueRanker(weights, bias, lambda: kernels)
    ranker.prepare()
    assert ranker._int4 is not None and ranker._int4.native is not None
    out = rows_for(weights, INT4_TRIAL + 10)[2:]
    scores = torch.addmm(bias, out, weights.t())
    for i in range(len(out)):
        got = ranker.top_k(out[i : i + 1], 20)
        top = torch.topk(scores[i], 20).values
        torch.testing.assert_close(got.scores[0], top, rtol=0, atol=1e-5)
        torch.testing.assert_close(scores[i, got.items[0]], top, rtol=0, atol=1e-5)
    assert ranker.settled["int4"] >= 0.9 * len(out)  # and the tier is kept past its trial
    assert [t.name for t in ranker.tiers(1)][0] == "int4"


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_compiled_bounds_cover_a_bias_rounded_in_once_per_block_of_the_sum(
    kernels: SimpleNamespace, rows: int
) -> None:
    """torch's BLAS adds each block of a long sum into an output that already holds the bias
    (from 4 rows on): a large bias is then rounded in several times (reviewer's case)."""
    dim, n = 4096, 64
    bias = torch.full((n,), 2.0**20)  # ulp 0.125
    weights = torch.full((n, dim), 0.0703125)  # on the int4 grid: no quantisation error
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), kernels)
    out = torch.zeros(rows, dim)
    out[:, ::64] = 1.0  # 64 products of 0.56 ulp of the bias each
    exact = torch.addmm(bias, out, weights.t())
    for simd in (True, False):
        assert bool((int4.native_upper(out, simd) >= exact).all())


def test_compiled_bounds_hold_for_scores_in_the_subnormal_range(kernels: SimpleNamespace) -> None:
    """Products below 2^-126 round with an absolute error, which no relative term covers."""
    dim, n = 4096, 32
    weights = torch.full((n, dim), 2.0**-80)
    out = torch.full((1, dim), 0.6 * 2.0**-69)  # each product 0.6 * 2^-149: rounds to 2^-149
    int4 = Int4Pass(weights, torch.zeros(n), weights.norm(dim=1), kernels)
    exact = torch.addmm(torch.zeros(n), out, weights.t())
    for simd in (True, False):
        assert bool((int4.native_upper(out, simd) >= exact).all())


def test_a_row_that_is_not_finite_gets_bounds_that_never_certify(kernels: SimpleNamespace) -> None:
    weights, bias = hard_catalogue("clustered", 100, 64)
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), kernels)
    out = torch.zeros(3, 64)
    out[0, 5], out[1, 7], out[2, 9] = float("nan"), float("inf"), float("-inf")
    for simd in (True, False):
        assert bool(torch.isnan(int4.native_upper(out, simd)).all())


@pytest.mark.parametrize("width", [70, 128])
def test_outputs_of_another_width_are_refused(kernels: SimpleNamespace, width: int) -> None:
    weights, bias = hard_catalogue("clustered", 100, 100)
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), kernels)
    with pytest.raises(RuntimeError, match=f"x \\(1 x {width}\\).*100 units"):
        int4.native_upper(torch.zeros(1, width))


def test_the_compiled_kernel_refuses_misshaped_input_with_a_reason(
    kernels: SimpleNamespace,
) -> None:
    weights, bias = hard_catalogue("clustered", 100, 64)
    int4 = Int4Pass(weights, bias, weights.norm(dim=1), kernels)
    with pytest.raises(RuntimeError, match="does not fit the packed weights"):
        int4.native_upper(torch.zeros(1, 65))
