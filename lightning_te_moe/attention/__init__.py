"""Attention on TE fused attention: GPT-OSS sink attention (``softmax_type="learnable"``) and standard causal
attention (``"vanilla"``) through ``DotProductAttention``."""

from .cores import AttentionCore, ReferenceCore, TECore, te_window
from .dispatch import IMPLEMENTATION, LayerSwap, swapped_attention
from .masks import DeferredMask, TEMask
from .report import AttentionEntry, AttentionSwapReport
from .swap import plan_reason, swap_attention, swap_for_plugin, te_unavailable_reason, unswap_attention

__all__ = [
    "IMPLEMENTATION", "AttentionEntry", "AttentionSwapReport", "DeferredMask", "LayerSwap", "ReferenceCore",
    "AttentionCore", "TECore", "TEMask", "plan_reason", "swap_attention", "swap_for_plugin", "swapped_attention",
    "te_unavailable_reason", "te_window", "unswap_attention",
]
