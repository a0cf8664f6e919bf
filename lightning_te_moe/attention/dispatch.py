"""The attention function registered with transformers for swapped models, and its per-layer state.

The model's attention module keeps its projections and RoPE and calls ``ALL_ATTENTION_FUNCTIONS[config.
_attn_implementation]``; a swapped model's config names :data:`IMPLEMENTATION`, whose function runs the
layer's attention core, or the model's original attention function with the model's own mask when
the core cannot run this call exactly (the reason is counted and warned about once).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor, nn

from .cores import AttentionCore
from .masks import DeferredMask

#: The name swapped configs carry in ``config._attn_implementation``.
IMPLEMENTATION = "lightning_te_moe"
#: Attribute (in the module's ``__dict__``, outside its state dict) holding a swapped layer's state.
SWAP_ATTR = "_te_moe_attention"


@dataclass
class LayerSwap:
    """A swapped attention layer: its core, what to fall back to, and how its calls went."""

    core: AttentionCore
    core_name: str
    original_implementation: str
    calls: Counter = field(default_factory=Counter)  # "core" or the fallback reason -> count
    _warned: set = field(default_factory=set)

    def original_function(self, module: nn.Module) -> Callable[..., Any]:
        """The function the unswapped model would call (its own eager function, or a registered one)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.original_implementation == "eager":
            return sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[self.original_implementation]


def register() -> None:
    """Make :data:`IMPLEMENTATION` known to transformers (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, swapped_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, DeferredMask.capture)


def _unsupported(swap: LayerSwap, query: Tensor, dropout: float, kwargs: dict[str, Any]) -> Optional[str]:
    if swap.core_name == "te" and query.device.type != "cuda":
        return f"tensors on {query.device.type}, TE runs on CUDA"
    if dropout:
        return "attention dropout"
    if kwargs.get("output_attentions"):
        return "attention weights requested"
    return None


def swapped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      s_aux: Optional[Tensor] = None, **kwargs: Any) -> tuple[Tensor, Optional[Tensor]]:
    """transformers' attention-function signature; returns ([batch, seq, heads, dim], None)."""
    swap: Optional[LayerSwap] = module.__dict__.get(SWAP_ATTR)
    if swap is None:
        raise RuntimeError(f"{type(module).__name__} runs with attn_implementation={IMPLEMENTATION!r} but was "
                           "not swapped: call lightning_te_moe.attention.swap_attention on the whole model")
    scaling = module.scaling if scaling is None else scaling
    reason = _unsupported(swap, query, dropout, kwargs)
    if reason is None:
        if not isinstance(attention_mask, DeferredMask):
            reason = "a prepared mask was passed to the model"
        else:
            te_mask = attention_mask.for_te(sliding_window)
            reason = te_mask.reason or None
    if reason is None:
        swap.calls["core"] += 1
        sinks = getattr(module, "sinks", None) if s_aux is None else s_aux
        return swap.core(query, key, value, sinks, scaling, sliding_window, te_mask.key_valid), None
    swap.calls[reason] += 1
    if reason not in swap._warned:
        swap._warned.add(reason)
        warnings.warn(f"[lightning-te-moe] attention of {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) "
                      f"runs the model's own {swap.original_implementation} path for this call: {reason}", stacklevel=2)
    mask = attention_mask.build(swap.original_implementation) if isinstance(attention_mask, DeferredMask) else attention_mask
    return swap.original_function(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                          sliding_window=sliding_window, s_aux=s_aux, **kwargs)
