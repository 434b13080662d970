"""Matrix products of a training step with bfloat16 operands (``train.matmul: bf16``).

The eight products of a GRU4Rec step (input and recurrent gates, scores; their backward) are
most of its time on a CPU. With bf16 operands they run ~2.4x faster where the CPU multiplies bf16
natively (AVX512-BF16, AMX; measured 400 vs 160 GFLOP/s at the (b) shapes) and on GPUs. Only
the products' operands and results are rounded to bf16: parameters, optimiser state, gate
arithmetic, hidden states and losses stay fp32.
"""

from __future__ import annotations

from typing import Any

import torch


class _Bf16Linear(torch.autograd.Function):
    """``x @ w.T + bias`` with bf16 operands, fp32 result; backward products in bf16 too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xb, wb = x.bfloat16(), w.bfloat16()
        ctx.save_for_backward(xb, wb)
        return torch.mm(xb, wb.t()).float().add_(bias)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        xb, wb = ctx.saved_tensors
        gb = grad.bfloat16()
        gx = torch.mm(gb, wb).float() if ctx.needs_input_grad[0] else None
        gw = torch.mm(gb.t(), xb).float() if ctx.needs_input_grad[1] else None
        gbias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gbias


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, bf16: bool) -> torch.Tensor:
    """``x @ w.T + bias`` (x (B, K), w (N, K), bias (N,)) in fp32, or with bf16 operands."""
    if bf16:
        return _Bf16Linear.apply(x, w, bias)  # type: ignore[no-any-return]
    return torch.addmm(bias, x, w.t())


def use_bf16(setting: str, device: torch.device) -> bool:
    """Resolve ``train.matmul``: "auto" is bf16 only where it is faster (a bf16-capable CPU)."""
    if setting == "auto":
        return device.type == "cpu" and bf16_is_native()
    return setting == "bf16"


def bf16_is_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (else bf16 products are emulated, slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
