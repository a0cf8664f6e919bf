"""The up-projection's bias added inside the GLU activation, one Triton kernel each way (TE's native grouped GEMM).

On TE's native grouped GEMM the fc1 bias is not a GEMM epilogue: TE adds it in a pass of its own over the
``[rows, 2I]`` output (read and write) and reduces its gradient in another (one more read): 0.55 + 0.27 ms a step of
the GPT-OSS-20B expert layer at 16,384 tokens under FP8 current scaling (H100, cuBLASLt 13.10, 2026-11-27). Here the
GEMM runs without it and the activation kernel reads the row's expert bias as it reads the row; its backward writes
``dh`` and sums each expert's bias gradient from the values it already holds. Measured the same day: the layer's
step 16.2 against 16.7 ms with CUDA graphs, 17.5 against 19.0 ms eager; the kernels alone 0.46 + 0.89 ms against
TE's 0.38 + 0.63 ms activation plus its 0.82 ms of bias passes (docs/performance.md).

The kernels walk the experts' row ranges (from the split sizes on the device: no host sync), as TE's own grouped
bias-gradient kernel does (``compute_grouped_dbias``): each program takes one expert, a share of its rows and a
block of columns, so it holds one bias block and, backward, sums its gradient in registers and adds it once (fp32
atomic adds from a few programs per element: not bitwise deterministic, like TE's; under
``torch.use_deterministic_algorithms(True)`` TE adds the bias instead). Slack and padding rows belong to an expert's
range like any row: their output gradient is zero, so they add nothing to the bias gradient.

The math is the activation module's own (:class:`~.activations.GLU` with SiLU, :class:`~.activations.ClampedSwiGLU`,
the gradient's clamp masks as TE's ``clamped_dswiglu``), applied to ``h + bias`` in fp32 before one rounding.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

from .routing import split_bounds

#: Rows and columns (of each half) a kernel program handles at a time, programs per expert and column block, and
#: warps per program: the fastest backward of 50 configurations timed on an H100 (benchmarks/bias_glu_kernels.py).
#: Triton's software-pipelining stages for the row loop changed nothing (1-4 stages: backward 0.882-0.884 ms against
#: TE's 0.622 ms dswiglu without a bias, H100, 2026-11-28), so the launch keeps Triton's default.
_BLOCK_ROWS = 32
_BLOCK_COLS = 64
_ROW_SPLITS = 4
_WARPS = 4


@dataclass(frozen=True)
class GLUParams:
    """``(clamp(up, -limit, limit) + offset) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``;
    ``limit=None``: no clamps (SwiGLU is ``alpha=1, offset=0``)."""

    limit: Optional[float]
    alpha: float
    offset: float


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Looked up once: every expert layer asks on every forward."""
    return importlib.util.find_spec("triton") is not None


def fused_bias_glu_runs(x: Tensor, params: Optional[GLUParams]) -> bool:
    """The kernel serves this call: a CUDA input, Triton importable, a GLU it computes, and no
    deterministic-algorithms mode (its bias gradient adds atomically)."""
    return (x.is_cuda and params is not None and triton_available()
            and not torch.are_deterministic_algorithms_enabled())


def bias_glu(h: Tensor, bias: Tensor, device_splits: Tensor, params: GLUParams) -> Tensor:
    """``glu(h + bias[e])`` on every row of expert ``e``: ``h [rows, 2I]`` (``[gate | up]``), ``bias [E, 2I]``,
    ``device_splits [E]`` the rows of each expert in order, summing to ``rows``."""
    if h.dim() != 2 or h.size(1) % 2 or bias.shape != (device_splits.numel(), h.size(1)):
        raise ValueError(f"bias_glu takes h [rows, 2I], bias [E, 2I] and E split sizes; got h {tuple(h.shape)}, "
                         f"bias {tuple(bias.shape)}, {device_splits.numel()} split sizes")
    return _BiasGLU.apply(h, bias, split_bounds(device_splits), params)


class _BiasGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, bounds: Tensor, params: GLUParams) -> Tensor:
        h = h.contiguous()
        bias_c = bias.detach().contiguous()
        width = h.size(1) // 2
        out = h.new_empty(h.size(0), width)
        if h.size(0):
            fwd, _ = _kernels()
            fwd[_grid(bounds, width)](h, bias_c, bounds, out, width, *_scalars(params),
                                      CLAMP=params.limit is not None, SPLITS=_ROW_SPLITS, BLOCK_R=_BLOCK_ROWS,
                                      BLOCK_C=_BLOCK_COLS, num_warps=_WARPS)
        ctx.save_for_backward(h, bias_c, bounds)
        ctx.params, ctx.bias_dtype = params, bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        h, bias, bounds = ctx.saved_tensors
        need_h, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        width = h.size(1) // 2
        dh = torch.empty_like(h)
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_bias else dh
        if h.size(0):
            _, bwd = _kernels()
            bwd[_grid(bounds, width)](grad, h, bias, bounds, dh, dbias, width, *_scalars(ctx.params),
                                      CLAMP=ctx.params.limit is not None, DBIAS=need_bias, SPLITS=_ROW_SPLITS,
                                      BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS, num_warps=_WARPS)
        return dh if need_h else None, dbias.to(ctx.bias_dtype) if need_bias else None, None, None


def _grid(bounds: Tensor, width: int) -> tuple[int, int, int]:
    return bounds.numel() - 1, _ROW_SPLITS, -(-width // _BLOCK_COLS)


def _scalars(params: GLUParams) -> tuple[float, float, float]:
    return (float(params.limit) if params.limit is not None else 0.0, float(params.alpha), float(params.offset))


def _kernels() -> tuple[Any, Any]:
    from . import bias_glu_triton

    return bias_glu_triton.bias_glu_fwd, bias_glu_triton.bias_glu_bwd
