"""Low-bit copies of the item matrix and rigorous upper bounds on every item's fp32 score.

``recsys.ranking`` ranks a session's output ``x`` against the whole catalogue; on a CPU that
product is memory-bound, so reading fewer bytes is what makes it fast. A pass here reads a
quantised copy of ``W`` through one of torch's weight-only kernels and returns, for every
item, a number that is *provably* at least the item's exact fp32 score ``x . w_j + b_j``. The
ranker rescores the best bounds in fp32 and certifies the answer (or falls back), so nothing
is approximate. For one or a few sessions at a time (a live click):

- ``Int8Pass``: one scale per item, 22 MB for 43k x 512; its bounds certify every real row.
- ``Int4Pass``: a scale and zero per group of 64 weights, 12 MB; looser bounds, so the ranker
  uses it as a first tier with more candidates and sends the rows it cannot certify on to int8.

For batches, ``Bf16Pass``: one bf16 GEMM with a single bound per row. Each weight-only kernel is
checked against the same arithmetic in fp32 on a probe when its copy is built; a kernel that
disagrees disables its pass (a wrong kernel must never feed the bounds).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_UNIT = 2.0**-24
_INT8_LEVELS = 126  # |w / scale| <= 126 (1 + u) < 127 even after the scale is rounded to bf16
INT4_GROUP = 64  # weights per int4 scale and zero (32: tighter bounds, 12 % more bytes)
_ROUND_UP = 1 + 2.0**-16  # inflates a bound computed in fp32 past its own rounding


def pad_to(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def fp32_absolute_terms(dim: int, max_norm: float, max_bias: float) -> tuple[float, float]:
    """The rounding of an fp32 reference score not relative to the item's own terms, as (per
    unit of ||x||, constant): its last additions (``4u ||x|| max||w||``); the bias, which a
    blocked BLAS sum rounds in once per block (``addmm`` over 4+ rows: 7 ulps of b measured at
    H = 4096), at most ``(2H + 4) u max|b|``; and products in the subnormal range,
    ``(2H + 16) 2^-150``. The compiled int4 pass takes the two terms apart."""
    u = FP32_UNIT
    return 4 * u * max_norm, (2 * dim + 4) * u * max_bias + (2 * dim + 16) * 2.0**-150


def fp32_absolute(dim: int, l2: float, max_norm: float, max_bias: float) -> float:
    """``fp32_absolute_terms`` for a row of norm ``l2``."""
    per_norm, constant = fp32_absolute_terms(dim, max_norm, max_bias)
    return per_norm * l2 + constant


def maxima(norms: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    """max ||w_j|| and max |b_j|, the catalogue-wide terms of every pass's bound."""
    if not len(norms):
        return 0.0, 0.0
    return float(norms.max()), float(bias.abs().max())


class Int8Pass:
    """Per-item symmetric int8 weights: ``w_j ~ s_j q_j`` with ``s_j`` a bf16 scale.

    Bound, item j: ``w_j = s_j q_j + d_j`` with ``|d_jk| <= s_j / 2``, so
    ``|x.d_j| <= s_j ||x||_1 / 2``; rounding ``x`` to bf16, the dequantised weights and the
    output each cost at most ``u ||x|| ||w_j||`` (u = 2^-8, Cauchy-Schwarz), counted four times
    for slack; fp32 sums (ours and the reference's) add ``2 H 2^-24 ||x|| ||w_j||``.
    """

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor, norms: torch.Tensor) -> None:
        self.dim = weights.shape[1]
        self.bias, self.norms = bias, norms
        self.max_norm, self.max_bias = maxima(norms, bias)
        amax = weights.abs().amax(1)
        self.scale16 = torch.where(amax > 0, amax / _INT8_LEVELS, 1.0).bfloat16()
        self.scale = self.scale16.float()
        q = torch.round(weights / self.scale.unsqueeze(1)).to(torch.int8)
        # torch 2.13's kernel reads garbage (even segfaults) unless the inner dimension is a
        # multiple of 16 (measured): pad with zero columns, which change no score.
        self.q = torch.nn.functional.pad(q, (0, pad_to(self.dim, 64) - self.dim)).contiguous()
        self.ok = self._kernel_agrees(weights)

    def product(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel itself: (M, n) bf16 approximations of ``out @ weights.T``."""
        padded = torch.nn.functional.pad(out, (0, self.q.shape[1] - self.dim))
        return torch.ops.aten._weight_int8pack_mm(padded.bfloat16(), self.q, self.scale16)

    def _kernel_agrees(self, weights: torch.Tensor) -> bool:
        probe = _probe(self.dim, weights.device)
        got = self.product(probe).float()
        dequantised = self.q[:, : self.dim].float() * self.scale.unsqueeze(1)
        expected = probe.bfloat16().float() @ dequantised.t()
        tolerance = 4 * BF16_UNIT * float(probe.norm(dim=1).max()) * self.max_norm + 1e-6
        return bool(torch.isfinite(got).all()) and float((got - expected).abs().max()) <= tolerance

    def upper(self, out: torch.Tensor) -> torch.Tensor:
        """(M, n) upper bounds, in a handful of in-place ops (this is a click's path)."""
        approx = self.product(out).float()
        approx.add_(self.bias)
        rel = 4.1 * BF16_UNIT + 2 * self.dim * FP32_UNIT
        for i in range(len(out)):  # a row or two: per-row scalars beat (M, n) broadcasts
            l1, l2 = float(out[i].abs().sum()), float(out[i].norm())
            absolute = fp32_absolute(self.dim, l2, self.max_norm, self.max_bias)
            approx[i].add_(self.scale, alpha=0.5 * l1).add_(self.norms, alpha=rel * l2)
            approx[i].add_(absolute)
        return approx


class Int4Pass:
    """Asymmetric int4 weights in groups of ``INT4_GROUP``: ``D_jk = (q_jk - 8) s_jg + z_jg``
    with bf16 ``s`` and ``z``, which is what torch's CPU int4 kernel dequantises.

    Bound, item j, group g (``D_j`` as computed here; the kernel computes it in fp32 too, exactly
    on AVX-512, rounded once more on AVX2, which the sum term below covers):
    - quantisation: ``|x.(w_j - D_j)| <= sum_g ||x_g||_1 e_jg``, ``e_jg`` the group's largest
      ``|w - D|``, measured;
    - the kernel rounds ``x`` and its output to bf16 (and may round ``D_j``): each at most
      ``u ||x|| ||D_j||`` (Cauchy-Schwarz), counted four times for slack, as for int8;
    - its fp32 sums, in whatever order it factors them: at most ``(H + 2G + 4) 2^-24`` times
      ``sum_g ||x_g||_1 (8 s_jg + |z_jg|)``, as every term is at most that in magnitude;
    - the reference's fp32 sums and bias add, as for int8.
    The group terms are one (M, G) x (G, n) product per batch.

    With ``kernels`` (the compiled module, where the CPU has AVX-512 VNNI) the same copy is laid
    out for ``kernels_int4.cpp``, which rounds ``x`` to int8 per row (``x ~ s_x x_q``) and sums
    the products exactly in integers: the bf16 term becomes ``||x - s_x x_q|| ||D_j||``, the
    group terms use ``max(||x_g||_1, s_x ||x_q,g||_1)``, and the kernel adds the bound itself.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        bias: torch.Tensor,
        norms: torch.Tensor,
        kernels: Any = None,
    ) -> None:
        n, self.dim = weights.shape
        self.n_items, self.bias, self.norms = n, bias, norms
        self.max_norm, self.max_bias = maxima(norms, bias)
        self.padded_dim = pad_to(self.dim, INT4_GROUP)
        rows = pad_to(n, 16)  # the kernels' tile of output columns
        w = torch.nn.functional.pad(weights, (0, self.padded_dim - self.dim, 0, rows - n))
        groups = w.view(rows, self.padded_dim // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(2), groups.amax(2)
        scale = ((high - low) / 15).clamp_min(2.0**-100).bfloat16().float()
        zero = (low + 8 * scale).bfloat16().float()
        q = torch.round((groups - zero.unsqueeze(2)) / scale.unsqueeze(2) + 8).clamp(0, 15)
        dequantised = (q - 8) * scale.unsqueeze(2) + zero.unsqueeze(2)
        err = (groups - dequantised).abs().amax(2)  # (rows, G)
        sums = (self.padded_dim + 2 * groups.shape[1] + 4) * FP32_UNIT
        slack = (err + sums * (8 * scale + zero.abs())) * _ROUND_UP  # (rows, G)
        d_norms = dequantised.reshape(rows, -1).norm(dim=1) * _ROUND_UP  # (rows,)
        self.d_norms = d_norms[:n]
        # recsys/model/kernels_int4.cpp where this CPU runs it (AVX-512 VNNI), else torch's
        self.native = kernels if kernels is not None and kernels.int4_vnni() else None
        if self.native is not None:
            self.layout = _native_layout(q, scale, zero, slack, bias, norms, d_norms)
            if self._native_agrees(weights, dequantised.view(rows, self.padded_dim)):
                self.ok = True
                return
            self.native = None
        self.group_slack = slack[:n].t().contiguous()  # (G, n)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).view(rows, self.padded_dim), 1
        )
        # (G, rows, 2): [scale, zero] per group and item, the kernel's layout
        self.scale_zero = torch.stack((scale, zero), 2).transpose(0, 1).contiguous().bfloat16()
        self.ok = self._kernel_agrees(dequantised.view(rows, self.padded_dim))

    def native_upper(self, out: torch.Tensor, simd: bool = True) -> torch.Tensor:
        """(M, n) upper bounds from the compiled pass (``simd=False``: its portable path)."""
        return self.native.int4_upper(  # type: ignore[union-attr]
            out.float().contiguous(),
            *self.layout,
            self.n_items,
            self.dim,
            2 * self.dim * FP32_UNIT,  # the reference's fp32 sums, as below
            *fp32_absolute_terms(self.dim, self.max_norm, self.max_bias),
            simd,
        )

    def _native_agrees(self, weights: torch.Tensor, dequantised: torch.Tensor) -> bool:
        """On two probe rows the compiled pass returns the bound above, computed here in torch
        (x rounded to int8 per row as the kernel does), and that bounds the exact scores."""
        probe = _probe(self.dim, weights.device)
        got = self.native_upper(probe)
        sx = probe.abs().amax(1, keepdim=True) / 127
        xq = torch.nn.functional.pad(
            torch.round(probe / sx).clamp(-127, 127), (0, self.padded_dim - self.dim)
        )
        x = torch.nn.functional.pad(probe, (0, self.padded_dim - self.dim))
        groups = (len(probe), -1, INT4_GROUP)
        l1 = torch.maximum(x.abs().view(groups).sum(2), xq.abs().view(groups).sum(2) * sx)
        resid, l2 = (x - xq * sx).norm(dim=1, keepdim=True), probe.norm(dim=1, keepdim=True)
        per_norm, constant = fp32_absolute_terms(self.dim, self.max_norm, self.max_bias)
        slack = self.layout[3].permute(0, 2, 1).reshape(-1, l1.shape[1])[: self.n_items]
        expected = (
            (xq * sx) @ dequantised[: self.n_items].t()
            + self.bias
            + l1 @ slack.t()
            + resid * self.d_norms
            + 2 * self.dim * FP32_UNIT * l2 * self.norms
            + per_norm * l2
            + constant
        )
        scale = float(l2.max()) * float(self.d_norms.max()) + self.max_bias + 1.0
        exact = torch.addmm(self.bias, probe, weights.t())
        return bool(
            torch.isfinite(got).all()
            and (got >= exact).all()
            and float((got - expected).abs().max()) <= 1e-5 * scale
        )

    def product(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel itself: (M, n) bf16 approximations of ``out @ weights.T``."""
        padded = torch.nn.functional.pad(out, (0, self.padded_dim - self.dim)).bfloat16()
        result = torch.ops.aten._weight_int4pack_mm_for_cpu(
            padded, self.packed, INT4_GROUP, self.scale_zero
        )
        return result[:, : self.n_items]

    def _kernel_agrees(self, dequantised: torch.Tensor) -> bool:
        probe = _probe(self.dim, dequantised.device)
        got = self.product(probe).float()
        padded = torch.nn.functional.pad(probe, (0, self.padded_dim - self.dim))
        expected = padded.bfloat16().float() @ dequantised[: self.n_items].t()
        bound = float(probe.norm(dim=1).max()) * float(self.d_norms.max())
        tolerance = 4 * BF16_UNIT * bound + 1e-6
        return bool(torch.isfinite(got).all()) and float((got - expected).abs().max()) <= tolerance

    def upper(self, out: torch.Tensor) -> torch.Tensor:
        """(M, n) upper bounds: the kernel's scores plus the slack above."""
        if self.native is not None:
            return self.native_upper(out)
        approx = self.product(out).float()
        padded = torch.nn.functional.pad(out.abs(), (0, self.padded_dim - self.dim))
        l1 = padded.view(len(out), -1, INT4_GROUP).sum(2)  # (M, G)
        approx.addmm_(l1, self.group_slack, alpha=_ROUND_UP)
        approx.add_(self.bias)
        rounding = 4.1 * BF16_UNIT
        reference = 2 * self.dim * FP32_UNIT
        for i in range(len(out)):
            l2 = float(out[i].norm()) * _ROUND_UP
            absolute = fp32_absolute(self.dim, l2, self.max_norm, self.max_bias)
            approx[i].add_(self.d_norms, alpha=rounding * l2).add_(self.norms, alpha=reference * l2)
            approx[i].add_(absolute)
        return approx


class Bf16Pass:
    """bf16 ``[w_j, b_j]`` per item, for batches: one GEMM, the bias riding along.

    Bound: inputs rounded (2u + u^2) and output rounded (u) give
    ``(3.02 u + 2 (H + 1) 2^-24) (||x|| max||w|| + max|b|)`` for every item of the row.
    """

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor, norms: torch.Tensor) -> None:
        self.dim = weights.shape[1]
        self.max_norm, self.max_bias = maxima(norms, bias)
        self.weights = torch.cat((weights, bias.unsqueeze(1)), 1).bfloat16()  # (n, H + 1)

    def product(self, out: torch.Tensor) -> torch.Tensor:
        """(M, n) bf16 approximations of ``out @ weights.T + bias``."""
        ones = torch.ones(len(out), 1, dtype=out.dtype, device=out.device)
        return torch.mm(torch.cat((out, ones), 1).bfloat16(), self.weights.t())

    def slack(self, out: torch.Tensor) -> torch.Tensor:
        """(M,) one bound on every item's error per row."""
        rel = 3.02 * BF16_UNIT + 2 * (self.dim + 1) * FP32_UNIT
        return rel * (out.norm(dim=1) * self.max_norm + self.max_bias)

    def upper(self, out: torch.Tensor) -> torch.Tensor:
        return self.product(out).float() + self.slack(out).unsqueeze(1)


def _native_layout(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slack: torch.Tensor,
    bias: torch.Tensor,
    norms: torch.Tensor,
    d_norms: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """kernels_int4.cpp's layout: tiles of 16 items; per tile and group, 8 blocks of 64 bytes in
    which item i's 4 bytes hold weights d..d+3 (low nibbles) and d+4..d+7 (high nibbles)."""
    rows, g = scale.shape
    tiles = rows // 16
    nibbles = q.to(torch.uint8).view(tiles, 16, g, 8, 2, 4)
    packed = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # (T, 16, G, 8, 4)
    packed = packed.permute(0, 2, 3, 1, 4).contiguous()  # (T, G, 8, 16 x 4 bytes)

    def per_tile(a: torch.Tensor) -> torch.Tensor:  # (rows, G) -> (T, G, 16)
        return a.view(tiles, 16, g).permute(0, 2, 1).contiguous()

    def padded(a: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(a.float(), (0, rows - len(a))).contiguous()

    return (
        packed.view(tiles, g, 8, 64),
        per_tile(scale),
        per_tile(zero),
        per_tile(slack),
        padded(bias),
        d_norms.contiguous(),
        padded(norms),
    )


def _probe(dim: int, device: torch.device) -> torch.Tensor:
    """Two fixed rows for a kernel's self-check (two: the kernels tile rows in pairs)."""
    ramp = torch.linspace(-1.0, 1.0, dim, device=device)
    return torch.stack((ramp, torch.cos(7.0 * ramp)))


PassT = TypeVar("PassT", Int8Pass, Int4Pass)


def build_pass(
    kind: type[PassT], weights: torch.Tensor, bias: torch.Tensor, norms: torch.Tensor, *extra: Any
) -> PassT | None:
    """A weight-only pass, or None where its kernel fails its self-check (or is missing)."""
    try:
        built = kind(weights, bias, norms, *extra)
    except (RuntimeError, NotImplementedError, AttributeError):  # AttributeError: no such op
        return None
    return built if built.ok else None
