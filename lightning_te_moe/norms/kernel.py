"""RMSNorm forward and backward as one TE kernel each (``transformer_engine_torch.rmsnorm_fwd/_bwd``).

TE's public ``te.RMSNorm`` computes in its weight's dtype (an FP32 weight turns a BF16 input into an FP32 output),
which is not the transformers math this swap must keep. The extension functions it calls take the dtypes as given:
both operands are widened to the wider of the input's and the weight's dtypes (exact), the kernel computes in FP32
and rounds once to the input's dtype, as GPT-OSS's ``(weight * x_normed).to(input_dtype)`` does. Their signature
is TE 2.9's (the package's floor) through 2.20. The only place this package calls TE's normalization.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def _tex() -> Any:
    """TE's extension module: importing ``transformer_engine.pytorch`` loads it (it is not on ``sys.path``)."""
    import transformer_engine.pytorch  # noqa: F401
    import transformer_engine_torch

    return transformer_engine_torch


class TERMSNormFunction(torch.autograd.Function):
    """``y = (w * x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` computed in FP32; saves the input and ``rsigma``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        from transformer_engine.pytorch.constants import TE_DType

        tex = _tex()
        compute = torch.promote_types(x.dtype, weight.dtype)
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).contiguous()
        w = weight.to(compute).contiguous()
        y, _, rsigma = tex.rmsnorm_fwd(rows.to(compute), w, eps, None, None, TE_DType[x.dtype], 0, False)
        ctx.save_for_backward(rows, rsigma, w)  # w: the weight itself where it is already in the compute dtype
        ctx.weight_dtype = weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        tex = _tex()
        rows, rsigma, w = ctx.saved_tensors
        dy = grad.reshape(rows.shape).to(w.dtype).contiguous()
        dx, dw = tex.rmsnorm_bwd(dy, rows.to(w.dtype), rsigma, w, 0, False)
        grad_x = dx.to(rows.dtype).view(grad.shape) if ctx.needs_input_grad[0] else None
        grad_w = dw.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def te_rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` over its last dimension, scaled by ``weight``, on TE's fused kernels (CUDA tensors)."""
    return TERMSNormFunction.apply(x, weight, eps)
