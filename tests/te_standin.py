"""A stand-in for Transformer Engine on the CPU: the parts of TE's interface the dense swap, the recompute, the norm
kernels and the plugin's forward context use (``te.Linear``, ``autocast``, recipes, the FP8 global state, the
alignment helper, the activation-recompute phases, ``rmsnorm_fwd/_bwd`` with their dtype combinations), in torch.

Its ``Linear`` runs a quantized recipe as FP8 would change the numbers: input and weight go through a per-tensor
E4M3 round trip (straight-through gradients), so a layer that runs outside the recipe (or on a stale cached
weight) computes visibly different values. With ``is_first_microbatch`` it caches the quantized weight as TE does,
in ``_fp8_workspaces["weight"]`` as a :class:`QuantizedTensor` (True: quantize and keep, False: reuse the kept copy,
None: quantize, keep nothing); a :class:`QuantizedTensor` given as the weight is used as it is (TE's primary
quantized weights).
"""

from __future__ import annotations

import enum
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Format(enum.Enum):
    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


class _Recipe:
    def __init__(self, **settings: Any) -> None:
        settings.setdefault("backward_override", None)
        self.settings = settings
        self.__dict__.update(settings)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.settings.items(), key=str))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in sorted(self.settings.items()))})"

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)


class DelayedScaling(_Recipe): ...
class Float8CurrentScaling(_Recipe): ...
class Float8BlockScaling(_Recipe): ...
class MXFP8BlockScaling(_Recipe): ...
class NVFP4BlockScaling(_Recipe): ...


@dataclass
class Call:
    """One stand-in ``te.Linear`` call: the recipe (its repr, None: not quantized), what ``is_first_microbatch``
    said, whether it ran in the recompute phase, how many rows it got."""

    layer: int
    recipe: Optional[str]
    first_microbatch: Optional[bool]
    recompute: bool
    rows: int


@dataclass
class State:
    """TE's process-wide autocast state, and what the stand-ins saw."""

    stack: list[tuple[bool, Any]] = field(default_factory=lambda: [(False, None)])
    phase: Optional[str] = None  # None, "forward" or "recompute"
    phases: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.stack[-1][0]

    @property
    def recipe(self) -> Any:
        return self.stack[-1][1]


STATE = State()


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled() -> bool:
        return STATE.enabled

    @staticmethod
    def get_fp8_recipe() -> Any:
        return STATE.recipe if STATE.recipe is not None else DelayedScaling()


class autocast:  # noqa: N801 - TE's name
    def __init__(self, enabled: bool = True, calibrating: bool = False, recipe: Any = None,
                 amax_reduction_group: Any = None) -> None:
        self.entry = (enabled, (recipe or DelayedScaling()) if enabled else None)

    def __enter__(self) -> None:
        STATE.stack.append(self.entry)

    def __exit__(self, *exc: Any) -> None:
        STATE.stack.pop()


class activation_recompute_forward:  # noqa: N801 - TE's name
    def __init__(self, activation_recompute: bool = False, recompute_phase: bool = False) -> None:
        self.phase = "recompute" if recompute_phase else "forward"

    def __enter__(self) -> None:
        STATE.phase = self.phase
        STATE.phases.append(self.phase)

    def __exit__(self, *exc: Any) -> None:
        STATE.phase = None


def get_align_size_for_quantization(recipe: Any) -> int:
    return {"MXFP8BlockScaling": 32, "NVFP4BlockScaling": 128}.get(type(recipe).__name__, 16)


def fake_fp8(t: Tensor) -> Tensor:
    """A per-tensor E4M3 round trip with a straight-through gradient."""
    amax = t.detach().abs().amax().clamp(min=1e-12)
    scale = 448.0 / amax
    q = (t.detach() * scale).to(torch.float8_e4m3fn).to(t.dtype) / scale
    return t + (q - t.detach())


class _AlsoSaves(torch.autograd.Function):
    """The identity on ``x`` that saves ``extra`` for its backward (one more saved tensor)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, extra: Tensor) -> Tensor:
        ctx.save_for_backward(extra)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class QuantizedTensor(Tensor):
    """TE's quantized tensor type (a ``torch.Tensor`` subclass): here the rounded values themselves."""


class Linear(nn.Module):
    """``te.Linear(in_features, out_features, bias, params_dtype, device)``; ``forward(inp, is_first_microbatch)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, params_dtype: Any = None,
                 device: Any = None, **_: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device="cpu"))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device="cpu")) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        self._fp8_workspaces: dict[str, Tensor] = {}
        self.quantized = 0  # how many times the weight was quantized

    def forward(self, inp: Tensor, is_first_microbatch: Optional[bool] = None) -> Tensor:
        recipe = STATE.recipe if STATE.enabled else None
        STATE.calls.append(Call(id(self), repr(recipe) if recipe is not None else None, is_first_microbatch,
                                STATE.phase == "recompute", inp.numel() // self.in_features))
        if recipe is None:
            return F.linear(inp, self.weight, self.bias)
        if isinstance(self.weight, QuantizedTensor):
            weight = self.weight.as_subclass(Tensor)
        elif is_first_microbatch is False:
            cached = self._fp8_workspaces.get("weight")
            assert cached is not None, "is_first_microbatch=False before any cached weight"
            weight = self.weight + (cached.as_subclass(Tensor) - self.weight.detach())
        else:
            weight = fake_fp8(self.weight)
            self.quantized += 1
            if is_first_microbatch:
                self._fp8_workspaces["weight"] = weight.detach().as_subclass(QuantizedTensor)
        if recipe.backward_override is None:
            inp = fake_fp8(inp)
        elif STATE.phase == "forward":
            # TE 2.20: under a backward_override the weight gets its columnwise copy only in the forward phase of
            # TE's activation recompute, not in the recompute phase: that forward saves one more tensor
            weight = _AlsoSaves.apply(weight, weight.detach().t().contiguous())
        return F.linear(inp, weight, self.bias)


#: TE's RMSNorm kernels without FP8 output: (weight, input) dtypes are one dtype; the output is that dtype or, from
#: FP32, a narrower one (TE's registered launchers). Backward: gradient, input and weight in one dtype.
def rmsnorm_fwd(x: Tensor, w: Tensor, eps: float, ln_out: Any, quantizer: Any, otype: torch.dtype, sm_margin: int,
                zero_centered_gamma: bool) -> list[Any]:
    assert x.dtype == w.dtype and (otype == x.dtype or x.dtype == torch.float32), (x.dtype, w.dtype, otype)
    assert x.dim() == 2 and ln_out is None and quantizer is None and not zero_centered_gamma
    rsigma = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
    return [(x.float() * rsigma[:, None] * w.float()).to(otype), None, rsigma]


def rmsnorm_bwd(dz: Tensor, x: Tensor, rsigma: Tensor, gamma: Tensor, sm_margin: int,
                zero_centered_gamma: bool) -> list[Tensor]:
    assert dz.dtype == x.dtype == gamma.dtype and rsigma.dtype == torch.float32, (dz.dtype, x.dtype, gamma.dtype)
    normed = x.float() * rsigma[:, None]
    dnormed = dz.float() * gamma.float()
    dx = rsigma[:, None] * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))
    return [dx.to(x.dtype), (dz.float() * normed).sum(0).to(gamma.dtype)]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def install(monkeypatch: pytest.MonkeyPatch) -> State:
    """Put the stand-in in ``sys.modules`` as ``transformer_engine`` and let the dense layers take the TE path on
    CPU tensors (and the norm swap find TE: on CPU tensors a swapped norm runs the model's own forward); returns the
    state (fresh for each test)."""
    import lightning_te_moe.dense.module as dense_module
    import lightning_te_moe.norms.swap as norm_swap

    state = State()
    monkeypatch.setattr(sys.modules[__name__], "STATE", state)
    recipe = _module("transformer_engine.common.recipe", Format=Format, DelayedScaling=DelayedScaling,
                     Float8CurrentScaling=Float8CurrentScaling, Float8BlockScaling=Float8BlockScaling,
                     MXFP8BlockScaling=MXFP8BlockScaling, NVFP4BlockScaling=NVFP4BlockScaling)
    common = _module("transformer_engine.common", recipe=recipe)
    quantization = _module("transformer_engine.pytorch.quantization", FP8GlobalStateManager=FP8GlobalStateManager,
                           get_align_size_for_quantization=get_align_size_for_quantization)
    distributed = _module("transformer_engine.pytorch.distributed",
                          activation_recompute_forward=activation_recompute_forward)
    constants = _module("transformer_engine.pytorch.constants",
                        TE_DType={dtype: dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)})
    pytorch = _module("transformer_engine.pytorch", Linear=Linear, autocast=autocast, quantization=quantization,
                      distributed=distributed, constants=constants)
    root = _module("transformer_engine", pytorch=pytorch, common=common)
    tex = _module("transformer_engine_torch", rmsnorm_fwd=rmsnorm_fwd, rmsnorm_bwd=rmsnorm_bwd)
    for module in (root, common, recipe, pytorch, quantization, distributed, constants, tex):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(dense_module, "te_runs", lambda x: True)
    monkeypatch.setattr(norm_swap, "te_available", lambda: True)
    return state
