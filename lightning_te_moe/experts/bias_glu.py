"""The up-projection's bias added inside the GLU activation, one Triton kernel each way (TE's native grouped GEMM).

On TE's native grouped GEMM the fc1 bias is not a GEMM epilogue: TE adds it in a pass of its own over the
``[rows, 2I]`` output (read and write) and reduces its gradient in another (one more read): about 0.8 ms of the
GPT-OSS-20B expert layer at 16,384 tokens on an H100 (cuBLASLt 13.10, docs/performance.md). Here the GEMM runs
without it and the activation kernel reads ``bias[expert of the row]`` as it reads the row; its backward writes
``dh`` and sums each expert's bias gradient from the values it already holds.

Which expert a row belongs to comes from the device split sizes, by blocks of rows: every expert's block is a
multiple of the routing's alignment, so a block of ``gcd(align, 128)`` rows (at least 16) never straddles two
experts and the kernel reads one expert id per block. The bias gradient is summed in fp32 by atomic adds, one
per block and column, so it is not bitwise deterministic (as TE's own grouped bias gradient,
``compute_grouped_dbias``); under ``torch.use_deterministic_algorithms(True)`` the bias stays TE's.

The math is the activation module's own (:class:`~.activations.GLU` with SiLU, :class:`~.activations.ClampedSwiGLU`,
the gradient's clamp masks as TE's ``clamped_dswiglu``), applied to ``h + bias`` in fp32 before one rounding.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

#: Rows per kernel block: the routing's alignment must be a multiple of it (FP8 recipes: 16 or 128).
MIN_BLOCK_ROWS = 16
_MAX_BLOCK_ROWS = 128
#: Columns of each half per kernel block.
_BLOCK_COLS = 256


@dataclass(frozen=True)
class GLUParams:
    """``(clamp(up, -limit, limit) + offset) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``;
    ``limit=None``: no clamps (SwiGLU is ``alpha=1, offset=0``)."""

    limit: Optional[float]
    alpha: float
    offset: float


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def block_rows(align: int) -> int:
    """Rows per kernel block for a routing padded to ``align`` rows per expert (0: too fine for the kernel)."""
    block = math.gcd(align, _MAX_BLOCK_ROWS)
    return block if block >= MIN_BLOCK_ROWS else 0


def fused_bias_glu_runs(x: Tensor, params: Optional[GLUParams], align: int) -> bool:
    """The kernel serves this call: a CUDA input, Triton importable, a GLU it computes, an alignment of at least
    16 rows, and no deterministic-algorithms mode (its bias gradient adds atomically)."""
    return (x.is_cuda and params is not None and block_rows(align) > 0 and triton_available()
            and not torch.are_deterministic_algorithms_enabled())


def block_experts(device_splits: Tensor, rows: int, block: int) -> Tensor:
    """Expert id of every ``block`` rows of the padded buffer, from the rows per expert on the device (no sync)."""
    ends = torch.cumsum(device_splits, 0)
    starts = torch.arange(0, rows, block, device=device_splits.device, dtype=ends.dtype)
    return torch.searchsorted(ends, starts, right=True).clamp_(max=device_splits.numel() - 1).to(torch.int32)


def bias_glu(h: Tensor, bias: Tensor, device_splits: Tensor, params: GLUParams, align: int) -> Tensor:
    """``glu(h + bias[expert of each row])`` for ``h [rows, 2I]`` (``[gate | up]``) and ``bias [E, 2I]``."""
    block = block_rows(align)
    if not block or h.size(0) % block:
        raise ValueError(f"the fused bias + GLU kernel needs rows per expert in multiples of {MIN_BLOCK_ROWS} "
                         f"(alignment {align}, {h.size(0)} rows)")
    experts = block_experts(device_splits, h.size(0), block)
    return _BiasGLU.apply(h, bias, experts, params, block)


class _BiasGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, experts: Tensor, params: GLUParams, block: int) -> Tensor:
        h = h.contiguous()
        bias_c = bias.detach().contiguous()
        width = h.size(1) // 2
        out = h.new_empty(h.size(0), width)
        if h.size(0):
            fwd, _ = _kernels()
            grid = (h.size(0) // block, _cdiv(width, _BLOCK_COLS))
            fwd[grid](h, bias_c, experts, out, width, *_scalars(params), CLAMP=params.limit is not None,
                      BLOCK_R=block, BLOCK_C=_BLOCK_COLS)
        ctx.save_for_backward(h, bias_c, experts)
        ctx.params, ctx.block, ctx.bias_dtype = params, block, bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        h, bias, experts = ctx.saved_tensors
        need_h, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        width = h.size(1) // 2
        dh = torch.empty_like(h)
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_bias else dh
        if h.size(0):
            _, bwd = _kernels()
            grid = (h.size(0) // ctx.block, _cdiv(width, _BLOCK_COLS))
            bwd[grid](grad, h, bias, experts, dh, dbias, width, *_scalars(ctx.params),
                      CLAMP=ctx.params.limit is not None, DBIAS=need_bias, BLOCK_R=ctx.block, BLOCK_C=_BLOCK_COLS)
        return (dh if need_h else None, dbias.to(ctx.bias_dtype) if need_bias else None, None, None, None)


def _scalars(params: GLUParams) -> tuple[float, float, float]:
    return (float(params.limit) if params.limit is not None else 0.0, float(params.alpha), float(params.offset))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=2)
def _built(interpret: bool) -> tuple[Any, Any]:
    """The two kernels, compiled (or, with ``TRITON_INTERPRET=1``, Triton's CPU interpreter: the CPU tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(h_ptr, bias_ptr, experts_ptr, out_ptr, width, limit, alpha, offset,
            CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(experts_ptr + block).to(tl.int64)
        rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_cols = cols < width
        mask = in_cols[None, :]
        at = rows[:, None] * (2 * width) + cols[None, :]
        bias_at = expert * (2 * width) + cols
        gate = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        gate += tl.load(bias_ptr + bias_at, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        up = tl.load(h_ptr + at + width, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(bias_ptr + bias_at + width, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        act = gate / (1.0 + tl.exp(-alpha * gate))  # TE: x * 1 / (1 + exp(-alpha x))
        out = (up + offset) * act
        tl.store(out_ptr + rows[:, None] * width + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd(grad_ptr, h_ptr, bias_ptr, experts_ptr, dh_ptr, dbias_ptr, width, limit, alpha, offset,
            CLAMP: tl.constexpr, DBIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(experts_ptr + block).to(tl.int64)
        rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_cols = cols < width
        mask = in_cols[None, :]
        at = rows[:, None] * (2 * width) + cols[None, :]
        bias_at = expert * (2 * width) + cols
        dy = tl.load(grad_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate_in = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        gate_in += tl.load(bias_ptr + bias_at, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        up_in = tl.load(h_ptr + at + width, mask=mask, other=0.0).to(tl.float32)
        up_in += tl.load(bias_ptr + bias_at + width, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        gate = gate_in
        up = up_in
        if CLAMP:
            gate = tl.minimum(gate_in, limit)
            up = tl.minimum(tl.maximum(up_in, -limit), limit)
        sig = 1.0 / (1.0 + tl.exp(-alpha * gate))
        act = gate * sig
        dact = sig + alpha * gate * sig * (1.0 - sig)
        dgate = dy * (up + offset) * dact
        dup = dy * act
        if CLAMP:
            dgate = tl.where(gate_in <= limit, dgate, 0.0)
            dup = tl.where((up_in >= -limit) & (up_in <= limit), dup, 0.0)
        tl.store(dh_ptr + at, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + width, dup.to(dh_ptr.dtype.element_ty), mask=mask)
        if DBIAS:
            tl.atomic_add(dbias_ptr + bias_at, tl.sum(dgate, axis=0), mask=in_cols)
            tl.atomic_add(dbias_ptr + bias_at + width, tl.sum(dup, axis=0), mask=in_cols)

    return fwd, bwd


def _kernels() -> tuple[Any, Any]:
    return _built(_interpreting())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
