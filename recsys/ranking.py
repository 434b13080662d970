"""Ranking, defined once: ties, target ranks, next-item targets, exclusions and exact top-k.

Evaluation, the baselines and serving all rank through this module, so "serving ranks as
evaluation does" rests on one implementation. ``rank_scores`` ranks a score matrix the caller
already has (the baselines); ``CatalogueRanker`` ranks GRU outputs against the item matrix.

Every recommendation and evaluated event scores the session's output ``x`` against the whole
item matrix, ``x @ W.T + b`` (43k x 512 fp32: 88 MB to read per session on a CPU). A cheap pass
(``recsys.quantized``: int4 then int8 copies of ``W`` for a few sessions, one bf16 GEMM for
batches) gives every item a rigorous *upper bound* on its exact fp32 score; the ``m`` best are
rescored in fp32, and if the k-th best exact score beats the m-th bound no other item can reach
the top k: the answer *is* the fp32 ranking (certified). Other rows go on to the next pass, past
the last to full fp32. Nothing is approximate; the tests hold results equal to full fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from recsys.core.fingerprint import tensor_key
from recsys.quantized import Bf16Pass, Int4Pass, Int8Pass, build_pass, maxima

TieMode = Literal["conservative", "standard", "median"]
Exclusions = Sequence[Sequence[int]]  # per row: the items that may not be recommended
# per row: items (M, L) with -1 for none, and what is added to their scores (M, L); an item at
# most once per row (the repeat readout's session items, recsys.model.readout)
Boost = tuple[torch.Tensor, torch.Tensor]
Kernels = Callable[[], Any]  # loads the compiled kernels module (or None): see CatalogueRanker

FAST_MIN_ITEMS = 8192  # below this a plain fp32 product is cheap enough
# Up to this many sessions the int8 matrix-vector pass, above it one bf16 GEMM. 8: with the
# trained Diginetica model the live service's micro-batches (mostly 2-8 rows at 250 clicks/s)
# ran at server p50 ~10 ms against ~20 ms with 2 (docs/benchmarks.md, live service).
GEMV_ROWS = 8
EXTRA_GEMV = 64  # candidates rescored beyond k after the int8 pass (per-item bounds)
# int4 (half int8's bytes, looser bounds) goes first for up to INT4_ROWS rows: +64, then +256 of
# the same candidates certify 80 % and 98 % of real Diginetica rows (the compiled pass; torch's:
# 73, 97), the rest go on to int8. Below INT4_MIN_SHARE of its first INT4_TRIAL rows: dropped.
INT4_ROWS, EXTRA_INT4 = 2, (64, 256)
INT4_TRIAL, INT4_MIN_SHARE = 256, 0.8
PASSES = ("int4", "int8", "bf16")
EXTRA_BATCH = 28  # after the bf16 pass (one bound per row; its gather dominates evaluation)


@dataclass(frozen=True)
class Tier:
    """One cheap pass of the certified ranking, the candidates it rescores beyond k, and its
    per-item upper bounds (None: the bf16 pass, one bound per row)."""

    name: str
    extra: int
    upper: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class TopK:
    """The exact top-k of each row; ``ranks`` only when targets were given."""

    items: torch.Tensor  # (M, k) int64 item indices, best first
    scores: torch.Tensor  # (M, k) float32 exact scores (-inf where exclusions ran the row dry)
    ranks: torch.Tensor | None  # (M,) int64 target ranks; k + 1 = beyond the top k
    certified: int  # rows settled by the cheap pass (the rest were scored in full fp32)


def rank_from_counts(
    ties: TieMode | str, above: torch.Tensor | None, at_least: torch.Tensor | None
) -> torch.Tensor:
    """The tie rule: conservative = #(score >= target's) (the target included), standard =
    #(score > target's) + 1, median = their mean. Only the counts a mode needs are required;
    ranks are 1-based floats (the median mode can be .5)."""
    if ties == "standard":
        assert above is not None
        return above.to(torch.float64) + 1
    assert at_least is not None
    if ties == "conservative":
        return at_least.to(torch.float64)
    assert above is not None
    return (at_least.to(torch.float64) + above.to(torch.float64) + 1) / 2


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, ties: TieMode | str) -> torch.Tensor:
    """1-based rank of each row's target among all items, by the tie rule of ``ties``."""
    target_scores = scores.gather(1, targets.view(-1, 1))  # (N, 1)
    above = (scores > target_scores).sum(1) if ties != "conservative" else None
    at_least = (scores >= target_scores).sum(1) if ties != "standard" else None
    return rank_from_counts(ties, above, at_least)


def next_item_targets(
    sessions: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The target of every prediction, session-major: each session's clicks after the first."""
    return torch.from_numpy(np.concatenate([s[1:] for s in sessions])).to(device)


def proper_prefixes(sessions: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every prefix that has a next click, session-major: the rows of an evaluation."""
    return [s[: t + 1] for s in sessions for t in range(len(s) - 1)]


def prefix_items(sessions: Sequence[np.ndarray]) -> list[list[int]]:
    """The items of every proper prefix, session-major: what ``exclude_seen`` leaves out."""
    return [p.tolist() for p in proper_prefixes(sessions)]


def fast_by_default(n_items: int) -> bool:
    """The certified pass pays off from ``FAST_MIN_ITEMS`` items; below, fp32 is as fast."""
    return n_items >= FAST_MIN_ITEMS


def mask_items(scores: torch.Tensor, exclude: Exclusions | None) -> None:
    """Set excluded items of each row to -inf, in place."""
    if not exclude:
        return
    rows = [i for i, e in enumerate(exclude) for _ in e]
    cols = [j for e in exclude for j in e]
    if cols:
        scores[
            torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)
        ] = float("-inf")


def add_boost(scores: torch.Tensor, boost: Boost | None) -> None:
    """Add each row's boost to its items' scores, in place."""
    if boost is not None:
        items, values = boost
        scores.scatter_add_(1, items.clamp_min(0), values.masked_fill(items < 0, 0.0))


def mask_items_at(
    scores: torch.Tensor, items: torch.Tensor, start: int, exclude: Exclusions | None
) -> None:
    """Set columns ``start:`` of ``scores`` to -inf where ``items`` (same shape) is excluded."""
    if not exclude:
        return
    for i, row in enumerate(exclude):
        if row:
            banned = torch.isin(items[i, start:], torch.tensor(list(row), device=items.device))
            scores[i, start:].masked_fill_(banned, float("-inf"))


def rank_scores(
    scores: torch.Tensor,
    k: int,
    exclude: Exclusions | None = None,
    targets: torch.Tensor | None = None,
    ties: TieMode | str = "conservative",
    boost: Boost | None = None,
) -> TopK:
    """Exact top-k of a full score matrix (M, n), boosted, then excluded items set to -inf
    (in place). Target ranks are exact up to ``k`` and ``k + 1`` beyond, as
    ``CatalogueRanker.top_k``."""
    k = min(k, scores.shape[1])
    add_boost(scores, boost)
    mask_items(scores, exclude)
    values, items = torch.topk(scores, k, dim=1)
    ranks = None
    if targets is not None:
        ranks = target_ranks(scores, targets, ties).clamp(max=k + 1)
        # An excluded target cannot be recommended: a miss, also where fewer than k items are
        # left to outrank it (its -inf would otherwise tie its way into the top k).
        excluded = scores.gather(1, targets.view(-1, 1)).squeeze(1) == float("-inf")
        ranks = ranks.masked_fill(excluded, k + 1)
    return TopK(items, values, ranks, 0)


class CatalogueRanker:
    """Exact top-k of ``out @ weights.T + bias`` with certified low-precision passes first."""

    def __init__(
        self, weights: torch.Tensor, bias: torch.Tensor, kernels: Kernels | None = None
    ) -> None:
        self.weights, self.bias = weights.detach(), bias.detach()
        self._kernels = kernels  # loads the compiled int4 pass (else torch's int4 kernel)
        self.n_items, self.dim = self.weights.shape
        with torch.no_grad():
            self.norms = self.weights.norm(dim=1)  # (n,)
            self.max_norm, self.max_bias = maxima(self.norms, self.bias)
        self._int8: Int8Pass | None = None
        self._int4: Int4Pass | None = None
        self._bf16: Bf16Pass | None = None
        self._gemv_built = False  # the int8 and int4 copies (either may fail its self-check)
        self._int4_judged = False
        # rows that entered each pass, and rows each pass certified
        self.tried, self.settled = dict.fromkeys(PASSES, 0), dict.fromkeys(PASSES, 0)

    # --- the cheap passes -------------------------------------------------------------------

    def uses_gemv(self, rows: int) -> bool:
        """int8 weight-only GEMV for a few rows on CPU (torch's kernel is CPU/bf16-only)."""
        if rows <= GEMV_ROWS and self.weights.device.type == "cpu":
            self.prepare(gemv=True)
        return rows <= GEMV_ROWS and self._int8 is not None

    def tiers(self, rows: int) -> list[Tier]:
        """The cheap passes ``rows`` sessions go through, first to last, with the candidates
        each rescores beyond k: int4 then int8 for a click or two, int8 up to ``GEMV_ROWS``
        rows, else bf16. A row that no tier certifies is scored in full fp32."""
        if not self.uses_gemv(rows) or self._int8 is None:
            return [Tier("bf16", EXTRA_BATCH, None)]
        int8 = Tier("int8", EXTRA_GEMV, self._int8.upper)
        if rows <= INT4_ROWS and self._int4 is not None:
            int4 = [Tier("int4", extra, self._int4.upper) for extra in EXTRA_INT4]
            return [*int4, int8]
        return [int8]

    def prepare(self, gemv: bool = True) -> None:
        """Build the low-precision copies now (so that the first request does not pay for them)."""
        with torch.no_grad():
            if gemv and not self._gemv_built:
                self._int8 = build_pass(Int8Pass, self.weights, self.bias, self.norms)
                if self._int8 is not None:  # int4 only ever in front of int8
                    native = self._kernels() if self._kernels is not None else None
                    self._int4 = build_pass(Int4Pass, self.weights, self.bias, self.norms, native)
                self._gemv_built = True
            if not gemv and self._bf16 is None:
                self._bf16 = Bf16Pass(self.weights, self.bias, self.norms)

    def upper_bounds(self, out: torch.Tensor, tier: int = 0) -> torch.Tensor:
        """(M, n) upper bounds on every item's exact fp32 score from the ``tier``-th pass that M
        rows use (``recsys.quantized`` derives each pass's bounds)."""
        with torch.inference_mode():
            upper = self.tiers(len(out))[tier].upper
            self.prepare(gemv=upper is not None)
            return upper(out) if upper is not None else self._bf16.upper(out)  # type: ignore

    def _judge_int4(self) -> None:
        """Once, after its first INT4_TRIAL rows: drop int4 where it costs more than it saves."""
        tried, settled = self.tried["int4"], self.settled["int4"]
        if self._int4 is not None and not self._int4_judged and tried >= INT4_TRIAL:
            self._int4_judged = True
            self._int4 = None if settled < INT4_MIN_SHARE * tried else self._int4

    def _candidates(
        self, tier: Tier, out: torch.Tensor, m: int, exclude: Exclusions | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The m items with the best upper bounds per row: (bounds (M, m) fp32, items (M, m))."""
        if tier.upper is not None:
            upper = tier.upper(out)
            mask_items(upper, exclude)
            return torch.topk(upper, m, dim=1)
        self.prepare(gemv=False)  # one bound per row: the best bounds are the best scores
        approx = self._bf16.product(out)  # type: ignore[union-attr]
        mask_items(approx, exclude)
        values, cand = torch.topk(approx, m, dim=1)
        return values.float() + self._bf16.slack(out).unsqueeze(1), cand

    # --- the exact answer -------------------------------------------------------------------

    def full_scores(
        self, out: torch.Tensor, exclude: Exclusions | None = None, boost: Boost | None = None
    ) -> torch.Tensor:
        """(M, n) fp32 scores over the catalogue, boosted; excluded items get -inf."""
        scores = torch.addmm(self.bias, out, self.weights.t())
        add_boost(scores, boost)
        mask_items(scores, exclude)
        return scores

    def top_k(
        self,
        out: torch.Tensor,
        k: int,
        exclude: Exclusions | None = None,
        targets: torch.Tensor | None = None,
        ties: str = "conservative",
        fast: bool = True,
        boost: Boost | None = None,
    ) -> TopK:
        """Exact top-k of each row of ``out`` (M, H), and the targets' ranks when given.

        ``exclude`` lists, per row, items that may not be recommended (they score -inf).
        ``boost`` adds to a few items per row; those are always rescored exactly (the cheap
        pass leaves them out, so its bounds cover the unboosted items only).
        A target's rank is exact whenever it is within the top k, else k + 1.
        """
        k, out = min(k, self.n_items), out.contiguous()  # the weight-only kernels need it
        with torch.inference_mode():
            # Decided before uses_gemv, which would build the int8 copy. On a GPU the full fp32
            # product is cheap, and cuBLAS may reduce bf16 products in reduced precision, which
            # the bounds below do not cover: the fast pass is for CPUs only.
            if not fast or self.weights.device.type != "cpu":
                return rank_scores(self.full_scores(out), k, exclude, targets, ties, boost)
            cheap_exclude = exclude
            if boost is not None:  # boosted items skip the cheap pass: candidates by right
                forced = [[j for j in row if j >= 0] for row in boost[0].tolist()]
                cheap_exclude = [
                    [*e, *f] for e, f in zip(exclude or [[]] * len(out), forced, strict=True)
                ]
            most_excluded = (
                max((len(set(e)) for e in cheap_exclude), default=0) if cheap_exclude else 0
            )
            tiers = [t for t in self.tiers(len(out)) if k + t.extra < self.n_items - most_excluded]
            if not tiers:
                return rank_scores(self.full_scores(out), k, exclude, targets, ties, boost)
            found = self._certified_top_k(
                out, k, exclude, cheap_exclude, targets, ties, boost, tiers
            )
            self._judge_int4()
            return found

    def _certified_top_k(
        self,
        out: torch.Tensor,
        k: int,
        exclude: Exclusions | None,
        cheap_exclude: Exclusions | None,
        targets: torch.Tensor | None,
        ties: str,
        boost: Boost | None,
        tiers: list[Tier],
        found: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> TopK:
        """The first tier's candidates rescored in fp32; the rows it cannot certify go on to
        the next tier, and past the last one to full fp32 scoring. Consecutive tiers of one
        pass share its bounds (``found``): the next rescores more of the same candidates."""
        tier, m = tiers[0], k + tiers[0].extra
        fresh = found is None  # the pass's first stage: its rows are counted as tried
        if found is None:
            widest = max(t.extra for t in tiers if t.name == tier.name)
            found = self._candidates(tier, out, k + widest, cheap_exclude)
        upper, cand = found[0][:, :m], found[1][:, :m]
        if boost is not None:
            cand = torch.cat((cand, boost[0].clamp_min(0)), 1)  # (M, m + L)
        idx = cand if targets is None else torch.cat((cand, targets.view(-1, 1)), 1)
        exact = torch.bmm(self.weights[idx], out.unsqueeze(2)).squeeze(2) + self.bias[idx]
        cand_exact = exact[:, : cand.shape[1]]
        if boost is not None:
            items_b, values_b = boost
            cand_exact[:, m:] += values_b
            cand_exact[:, m:].masked_fill_(items_b < 0, float("-inf"))
            mask_items_at(cand_exact, cand, m, exclude)
        values, pos = torch.topk(cand_exact, k, dim=1)
        items = cand.gather(1, pos)
        # Every item outside the candidates scores at most the m-th bound.
        certified = values[:, k - 1] > upper[:, m - 1]
        ranks = None
        if targets is not None:
            is_target = cand == targets.view(-1, 1)
            if boost is not None:  # a padding column is no candidate, whatever its index
                is_target[:, m:] &= boost[0] >= 0
            # A target among the candidates takes its candidate score: the same item in
            # another column of the product may be summed in another order (a kernel's tail).
            first = is_target.to(torch.int8).argmax(1, keepdim=True)
            target_score = torch.where(
                is_target.any(1, keepdim=True), cand_exact.gather(1, first), exact[:, -1:]
            )
            if exclude:  # an excluded target cannot be recommended: a miss, as in full scoring
                excluded = torch.tensor(
                    [int(t) in set(e) for t, e in zip(targets.tolist(), exclude, strict=True)],
                    device=out.device,
                )
                target_score = target_score.masked_fill(excluded.unsqueeze(1), float("-inf"))
            others = cand_exact.masked_fill(is_target, float("-inf"))
            above = (others > target_score).sum(1)
            at_least = (others >= target_score).sum(1) + 1  # + the target itself
            ranks = rank_from_counts(ties, above, at_least)
            inside = target_score.squeeze(1) >= values[:, k - 1]
            ranks = torch.where(inside, ranks, torch.full_like(ranks, k + 1))
            # A certified target inside the top k must be a candidate; if rounding ever
            # broke the bound, the row is rescored in full rather than trusted.
            certified &= ~(inside & ~is_target.any(1))
        rows = torch.nonzero(~certified).flatten()
        self.tried[tier.name] += len(out) if fresh else 0
        self.settled[tier.name] += len(out) - len(rows)
        if not len(rows):
            return TopK(items, values, ranks, len(out))
        picked = rows.tolist()
        sub = [exclude[i] for i in picked] if exclude else None
        sub_targets = None if targets is None else targets[rows]
        sub_boost = None if boost is None else (boost[0][rows], boost[1][rows])
        if len(tiers) > 1:
            sub_cheap = [cheap_exclude[i] for i in picked] if cheap_exclude else None
            same = tiers[1].name == tier.name
            sub_found = (found[0][rows], found[1][rows]) if same else None
            rest = self._certified_top_k(
                out[rows], k, sub, sub_cheap, sub_targets, ties, sub_boost, tiers[1:], sub_found
            )
        else:
            rest = rank_scores(self.full_scores(out[rows]), k, sub, sub_targets, ties, sub_boost)
        items[rows], values[rows] = rest.items, rest.scores
        if ranks is not None and rest.ranks is not None:
            ranks[rows] = rest.ranks
        return TopK(items, values, ranks, len(out) - len(rows) + rest.certified)


def ranker_for(
    weights: torch.Tensor, bias: torch.Tensor, owner: object, kernels: Kernels | None = None
) -> CatalogueRanker:
    """The ranker of a model's current item matrix, cached on ``owner`` until the weights change."""
    key = (tensor_key(weights), tensor_key(bias))
    cached = getattr(owner, "_catalogue_ranker", None)
    if cached is None or cached[0] != key:
        cached = (key, CatalogueRanker(weights, bias, kernels))
        owner._catalogue_ranker = cached  # type: ignore[attr-defined]
    return cached[1]
