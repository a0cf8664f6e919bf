"""Activation checkpointing that recomputes under the precision the forward ran under.

transformers' ``gradient_checkpointing_enable()`` gives every decoder layer a checkpointing function (torch's
``checkpoint`` with the user's kwargs). Its recompute runs in the backward pass, outside the plugin's forward
context: torch's checkpoint restores torch autocast, but not TE's ``autocast`` (its recipe) nor TE's FP8
recompute state, so layers on TE would recompute in BF16 (wrong gradients, or torch's "recomputed values differ"
error) and delayed scaling would recompute with newer scales than the forward used.

:class:`PrecisionRecompute` wraps the model's own checkpointing function (reentrant or not, offloading or not): it
hands it the layer wrapped so that every call after the first (the recompute) re-enters the torch autocasts and
``te.autocast`` with the forward's recipe. Under delayed scaling the forward also runs in TE's
``activation_recompute_forward`` forward phase and the recompute in its recompute phase, so that TE recomputes with
the forward's scales: what TE's own ``te.pytorch.checkpoint`` does, on top of the user's checkpoint.

Only under delayed scaling, because elsewhere the phases buy nothing and change what TE saves: TE 2.20's
``Linear`` and ``GroupedLinear`` quantize a weight with its columnwise copy in the forward phase but not in the
recompute wherever they would not need it otherwise (a ``backward_override``; in ``Linear`` also an input that needs
no gradient, or FSDP2). Where the weight is quantized on every call (no cached copy, as on a sharded model) the
recompute then saves fewer tensors and torch's checkpoint stops the backward: "A different number of tensors was
saved during the original forward and recomputation" (387 against 319, a GPT-OSS-20B decoder layer under FSDP2 on 4 x
H200, the first step after the guard stepped down to ``fp8_current+hp_bwd``, 2026-11-28; reproduced on one H100 by
``tests/gpu/test_dense_gpu.py``).

:func:`install` puts it on every layer, and on every transformers model's ``_set_gradient_checkpointing``, so
checkpointing enabled after setup gets it too.
"""

from __future__ import annotations

import functools
import sys
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .console import print_rank_zero
from .policy.state import PrecisionState

_DEVICES = ("cpu", "cuda")
_PATCHED = "_te_moe_precision_recompute"


# -- the TE side (imported lazily; only read where the process already imported TE) ------------------------------
def te_autocast_state() -> Optional[tuple[bool, Any]]:
    """``(quantized recipe active, that recipe)`` of TE's autocast now; None where TE was never imported."""
    if "transformer_engine.pytorch" not in sys.modules:
        return None
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    enabled = FP8GlobalStateManager.is_fp8_enabled()
    return enabled, FP8GlobalStateManager.get_fp8_recipe() if enabled else None


def te_phase(recompute: bool) -> AbstractContextManager:
    """TE's activation-recompute phase: the forward (TE keeps its scales for the recompute) or the recompute."""
    from transformer_engine.pytorch.distributed import activation_recompute_forward

    return activation_recompute_forward(activation_recompute=True, recompute_phase=recompute)


def te_autocast(enabled: bool, recipe: Any) -> AbstractContextManager:
    import transformer_engine.pytorch as te

    return te.autocast(enabled=enabled, recipe=recipe)


# -- the snapshot of one forward's precision ----------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionSnapshot:
    """The torch autocasts and TE autocast a checkpointed forward ran under, and whether it runs in TE's
    activation-recompute phases (``te_phases``: delayed scaling)."""

    autocast: tuple[tuple[str, bool, torch.dtype, bool], ...]
    te: Optional[tuple[bool, Any]]
    te_phases: bool

    @classmethod
    def capture(cls, delayed_scaling: bool) -> PrecisionSnapshot:
        cache = torch.is_autocast_cache_enabled()
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d), cache) for d in _DEVICES)
        te = te_autocast_state()
        return cls(autocast, te, te is not None and delayed_scaling)

    def forward(self) -> AbstractContextManager:
        stack = ExitStack()
        if self.te_phases:
            stack.enter_context(te_phase(recompute=False))
        return stack

    def recompute(self) -> AbstractContextManager:
        stack = ExitStack()
        for device, enabled, dtype, cache in self.autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache))
        if self.te is not None:
            if self.te_phases:
                stack.enter_context(te_phase(recompute=True))
            stack.enter_context(te_autocast(*self.te))
        return stack


class _Replay:
    """The checkpointed layer: its first call is the forward, every later call a recompute."""

    def __init__(self, function: Callable[..., Any], snapshot: PrecisionSnapshot) -> None:
        self.function, self.snapshot, self.calls = function, snapshot, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        with self.snapshot.forward() if self.calls == 1 else self.snapshot.recompute():
            return self.function(*args, **kwargs)


def delayed_autocast() -> bool:
    """Without a plan: TE's autocast runs delayed scaling now."""
    te = te_autocast_state()
    return te is not None and te[0] and bool(te[1].delayed())


class PrecisionRecompute:
    """A gradient-checkpointing function: the model's own (``inner``), recomputing under the forward's precision;
    ``delayed_scaling`` says at each forward whether the layer runs delayed scaling (the plugin's active rung)."""

    def __init__(self, inner: Callable[..., Any], delayed_scaling: Callable[[], bool] = delayed_autocast) -> None:
        self.inner, self.delayed_scaling = inner, delayed_scaling

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing will be recomputed
            return self.inner(function, *args, **kwargs)
        return self.inner(_Replay(function, PrecisionSnapshot.capture(self.delayed_scaling())), *args, **kwargs)

    def __repr__(self) -> str:
        return f"PrecisionRecompute({self.inner!r})"


# -- installing it --------------------------------------------------------------------------------------------------
def _wrap(func: Any, delayed_scaling: Callable[[], bool]) -> Any:
    if func is None or isinstance(func, PrecisionRecompute):
        return func
    return PrecisionRecompute(func, delayed_scaling)


def _set_gradient_checkpointing(original: Callable[..., Any], delayed_scaling: Callable[[], bool], *args: Any,
                                **kwargs: Any) -> Any:
    """transformers' ``_set_gradient_checkpointing`` with the checkpointing function wrapped."""
    if "gradient_checkpointing_func" in kwargs:
        kwargs["gradient_checkpointing_func"] = _wrap(kwargs["gradient_checkpointing_func"], delayed_scaling)
    elif len(args) > 1:
        args = (args[0], _wrap(args[1], delayed_scaling), *args[2:])
    return original(*args, **kwargs)


def install(model: nn.Module, delayed_scaling: Callable[[], bool] = delayed_autocast) -> int:
    """Wrap every checkpointing function set on ``model`` and hook every transformers model's
    ``_set_gradient_checkpointing`` (instance attribute) so later ``gradient_checkpointing_enable()`` calls are
    wrapped too. Returns how many checkpointing functions it wrapped now (idempotent)."""
    wrapped = 0
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, PrecisionRecompute):
            module._gradient_checkpointing_func = PrecisionRecompute(func, delayed_scaling)
            wrapped += 1
        setter = getattr(type(module), "_set_gradient_checkpointing", None)
        if callable(setter) and _PATCHED not in module.__dict__:
            # functools.wraps keeps the signature transformers inspects (no ``value``: the current format)
            hook = functools.wraps(setter)(functools.partial(_set_gradient_checkpointing,
                                                             functools.partial(setter, module), delayed_scaling))
            module.__dict__["_set_gradient_checkpointing"] = hook
            module.__dict__[_PATCHED] = True
    return wrapped


def uninstall(model: nn.Module) -> int:
    """Undo :func:`install`: the original checkpointing functions and methods back; returns how many."""
    restored = 0
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, PrecisionRecompute):
            module._gradient_checkpointing_func = func.inner
            restored += 1
        if module.__dict__.pop(_PATCHED, False):
            module.__dict__.pop("_set_gradient_checkpointing", None)
    return restored


def recompute_for_plugin(model: nn.Module, state: PrecisionState) -> Optional[tuple[str, dict]]:
    """The plugin's setup step: install; a decision when checkpointing functions were wrapped now."""
    wrapped = install(model, lambda: state.delayed_scaling)
    if not wrapped:
        return None
    summary = (f"gradient checkpointing of {wrapped} layer(s) recomputes under the forward's precision"
               " (torch autocast; TE autocast and recipe where TE runs; TE's recompute phases under delayed scaling)")
    print_rank_zero(f"[lightning-te-moe] {summary}")
    return summary, {"layers": wrapped, "plan": state.plan.summary()}
