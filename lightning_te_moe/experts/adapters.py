"""Adapters: recognise an experts module, say how its weights map to ours, and what replaces it.

Built in: transformers 5.x experts (``use_experts_implementation``) and 4.x ``nn.ModuleList`` blocks.
:func:`register_adapter` adds a user's own; adapters are tried in order, the most recently registered first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .activations import GLU, ClampedSwiGLU, HFGate, Ungated
from .block import ModuleListMoEBlock, routing_mismatch
from .layouts import FusedCodec, ModuleListCodec, WeightCodec, _interleave
from .lora import is_tuner_layer
from .module import GroupedExperts


class NotSwappable(Exception):
    """An adapter recognised the module but cannot reproduce it exactly; the message goes in the report."""


@dataclass
class ExpertsMatch:
    """What an adapter found: the codec for ``holder.state_dict()`` and the activation on ``[gate | up]``."""

    codec: WeightCodec
    activation: nn.Module
    holder: nn.Module


class ExpertsAdapter(ABC):
    """Base class for adapters; subclass it for a custom experts module and pass it to :func:`register_adapter`."""

    name: str = "custom"

    @abstractmethod
    def match(self, module: nn.Module) -> Optional[ExpertsMatch]:
        """An :class:`ExpertsMatch` if ``module`` is an experts module this adapter handles, else None."""

    def replace(self, module: nn.Module, experts: GroupedExperts) -> nn.Module:
        """What takes ``module``'s place in its parent (the experts module itself, by default)."""
        return experts


def _agrees(ours: Callable[[Tensor], Tensor], theirs: Callable[[Tensor], Tensor], width: int,
            like: Optional[Tensor] = None) -> bool:
    """Both give the same result on a probe whose rows span 1 to 300 (past any clamp limit; ``like``'s dtype)."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, width, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [6.0], [30.0], [300.0]],
                                                                                  dtype=torch.float64)
    if like is not None:
        if like.is_meta:
            return True  # nothing to compute with yet: trust the structure
        probe = probe.to(like.device, like.dtype)
    tol = 1e-12 if probe.dtype == torch.float64 else 1e-5
    with torch.no_grad():
        return torch.allclose(ours(probe).double(), theirs(probe).double(), rtol=tol, atol=tol)


class FusedExpertsAdapter(ExpertsAdapter):
    """transformers 5.x experts classes decorated with ``use_experts_implementation`` (GPT-OSS, Mixtral, ...)."""

    name = "transformers-5"

    def match(self, module: nn.Module) -> Optional[ExpertsMatch]:
        flags = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
        if not all(isinstance(getattr(module, f, None), bool) for f in flags):
            return None
        codec = FusedCodec(gated=module.has_gate, transposed=module.is_transposed,
                           interleaved=not module.is_concatenated, bias=module.has_bias)
        up, down = getattr(module, codec.up_name, None), getattr(module, "down_proj", None)
        if not (isinstance(up, Tensor) and isinstance(down, Tensor) and up.dim() == down.dim() == 3):
            return None
        width = up.size(2) if codec.transposed else up.size(1)
        return ExpertsMatch(codec, _fused_activation(module, codec, width), module)


def _fused_activation(module: nn.Module, codec: FusedCodec, width: int) -> nn.Module:
    """Our fast activation for the module's gate, or the module's own gate when ours would differ."""
    if not codec.gated:
        return Ungated(module.act_fn)
    if codec.interleaved and hasattr(module, "alpha") and hasattr(module, "limit"):
        candidate: Optional[nn.Module] = ClampedSwiGLU(module.alpha, module.limit)
    elif not codec.interleaved and hasattr(module, "act_fn"):
        candidate = GLU(module.act_fn)
    else:
        candidate = None

    def theirs(h: Tensor) -> Tensor:
        return module._apply_gate(_interleave(h, -1) if codec.interleaved else h)

    if candidate is not None and _agrees(candidate, theirs, width):
        return candidate
    return HFGate(module, codec.interleaved)


_MLP_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class ModuleListAdapter(ExpertsAdapter):
    """transformers 4.x sparse-MoE blocks: ``experts`` is an ``nn.ModuleList`` of gated MLPs, ``gate`` the router.

    The whole block is replaced (:class:`ModuleListMoEBlock`), so it is swapped only when its routing equals
    ours on probe tokens (:func:`~lightning_te_moe.experts.block.routing_mismatch`); otherwise it stays, with
    the reason in the swap report.
    """

    name = "transformers-4-modulelist"

    def match(self, module: nn.Module) -> Optional[ExpertsMatch]:
        experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
        if not (isinstance(experts, nn.ModuleList) and len(experts) and isinstance(router, nn.Linear)
                and isinstance(getattr(module, "top_k", None), int)):
            return None
        first = experts[0]
        if any(is_tuner_layer(m) for m in first.modules()):
            raise NotSwappable("PEFT adapters on the expert MLPs' Linear layers are not swapped (the swap keeps PEFT "
                               "LoRA only on transformers 5.x experts, through LoraConfig(target_parameters=...))")
        names = next((n for n in _MLP_NAMES if all(isinstance(getattr(first, a, None), nn.Linear) for a in n)), None)
        if names is None or not hasattr(first, "act_fn"):
            return None
        if getattr(module, "jitter_noise", 0):
            raise NotSwappable("router jitter noise (training-time randomness in the block) is not reproduced")
        gate, up, down = (getattr(first, n) for n in names)
        codec = ModuleListCodec(len(experts), *names, bias=gate.bias is not None)
        activation = GLU(first.act_fn)

        def ours(x: Tensor) -> Tensor:
            return down(activation(torch.cat([gate(x), up(x)], dim=-1)))

        if not _agrees(ours, first, gate.in_features, like=gate.weight):
            raise NotSwappable(f"{type(first).__name__}.forward is not down(act_fn(gate(x)) * up(x))")
        mismatch = routing_mismatch(module)
        if mismatch is not None:
            raise NotSwappable(mismatch)
        return ExpertsMatch(codec, activation, experts)

    def replace(self, module: nn.Module, experts: GroupedExperts) -> nn.Module:
        return ModuleListMoEBlock(module, experts)


_ADAPTERS: list[ExpertsAdapter] = [FusedExpertsAdapter(), ModuleListAdapter()]


def register_adapter(adapter: ExpertsAdapter) -> None:
    """Let :func:`~lightning_te_moe.experts.swap_experts` swap a custom experts module (tried before built-ins)."""
    if adapter not in _ADAPTERS:
        _ADAPTERS.insert(0, adapter)


def unregister_adapter(adapter: ExpertsAdapter) -> None:
    _ADAPTERS.remove(adapter)


def registered_adapters() -> tuple[ExpertsAdapter, ...]:
    return tuple(_ADAPTERS)
