"""Expert activations on the ``[gate | up]`` halves our fc1 produces (TE's layout), one per HF flavour.

Each reproduces the original model's math exactly; the swap verifies that numerically on a probe input and
falls back to :class:`HFGate` (the model's own ``_apply_gate`` on the re-built HF layout) when it does not.
``forward(h, fused=True)`` (the TE path) runs SwiGLU / clamped SwiGLU as one TE kernel each way instead of
about ten elementwise passes over the ``[rows, 2I]`` buffer, and saves only its input for backward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..policy.te_features import te_has
from .bias_glu import GLUParams

#: Activation classes whose ``act_fn(gate) * up`` TE's fused ``swiglu`` computes.
_SILU_NAMES = ("SiLU", "SiLUActivation")


class _TEGLU(torch.autograd.Function):
    """TE's fused (clamped) SwiGLU on ``[gate | up]``: ``clamp=None`` is plain SwiGLU.

    GPT-OSS's ``up + 1`` is TE's ``glu_linear_offset=1.0`` (an argument from TE 2.17); TE 2.9-2.16's
    clamped kernel takes no offset and always adds 1: the same function.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, clamp: Optional[tuple[float, float]]) -> Tensor:
        import transformer_engine_torch as tex

        h = h.contiguous()
        ctx.clamp = clamp
        ctx.save_for_backward(h)
        if clamp is None:
            return tex.swiglu(h, None)
        return tex.clamped_swiglu(h, None, *clamp, *_glu_offset())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        import transformer_engine_torch as tex

        (h,) = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.clamp is None:
            return tex.dswiglu(grad, h, None), None
        return tex.clamped_dswiglu(grad, h, None, *ctx.clamp, *_glu_offset()), None


def _glu_offset() -> tuple[float, ...]:
    """The ``glu_linear_offset`` argument where this TE's clamped SwiGLU takes one (TE >= 2.17)."""
    return (1.0,) if te_has("clamped_swiglu_offset") else ()


class GLU(nn.Module):
    """``act_fn(gate) * up``: SwiGLU for SiLU (Mixtral, Qwen3-MoE, DeepSeek-V3 and most 5.x experts)."""

    def __init__(self, act_fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, h: Tensor, fused: bool = False) -> Tensor:
        if fused and type(self.act_fn).__name__ in _SILU_NAMES:
            return _TEGLU.apply(h, None)
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def glu_params(self) -> Optional[GLUParams]:
        """SwiGLU for the fused bias kernel (:mod:`.bias_glu`); None for another ``act_fn``."""
        return GLUParams(None, 1.0, 0.0) if type(self.act_fn).__name__ in _SILU_NAMES else None

    def label(self) -> str:
        return f"glu({type(self.act_fn).__name__})"


class ClampedSwiGLU(nn.Module):
    """GPT-OSS: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.limit = float(limit)

    def forward(self, h: Tensor, fused: bool = False) -> Tensor:
        if fused:
            return _TEGLU.apply(h, (self.limit, self.alpha))
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def glu_params(self) -> Optional[GLUParams]:
        return GLUParams(self.limit, self.alpha, 1.0)

    def label(self) -> str:
        return f"clamped_swiglu(alpha={self.alpha}, limit={self.limit})"


class Ungated(nn.Module):
    """``act_fn(up)`` for experts without a gate projection (``has_gate=False``)."""

    def __init__(self, act_fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, h: Tensor, fused: bool = False) -> Tensor:
        return self.act_fn(h)

    def label(self) -> str:
        return f"ungated({type(self.act_fn).__name__})"


class HFGate(nn.Module):
    """The original class's ``_apply_gate``, run on a stand-in that carries the module's plain attributes.

    For interleaved layouts the halves are re-interleaved first, so any custom gate stays exact (slower).
    """

    def __init__(self, original: nn.Module, interleaved: bool) -> None:
        super().__init__()
        self._fn = type(original)._apply_gate
        self.interleaved = interleaved
        for name, value in vars(original).items():
            if not name.startswith("_") and name not in ("training", "config"):
                setattr(self, name, value)
        for name, child in original.named_children():
            setattr(self, name, child)

    def forward(self, h: Tensor, fused: bool = False) -> Tensor:
        if self.interleaved:
            gate, up = h.chunk(2, dim=-1)
            h = torch.stack((gate, up), dim=-1).flatten(-2)
        return self._fn(self, h)

    def label(self) -> str:
        return f"model's own {self._fn.__qualname__}"


def glu_params(activation: nn.Module) -> Optional[GLUParams]:
    """What the fused bias + GLU kernel computes for ``activation``; None where it does not (the model's own gate)."""
    params: Any = getattr(activation, "glu_params", None)
    return params() if callable(params) else None


def activation_label(activation: nn.Module) -> str:
    label: Any = getattr(activation, "label", None)
    return label() if callable(label) else type(activation).__name__
