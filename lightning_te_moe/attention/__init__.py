"""Attention on TE fused attention: GPT-OSS sink attention via ``DotProductAttention(softmax_type="learnable")``."""

from .cores import ReferenceCore, SinkAttentionCore, TECore, te_window
from .dispatch import IMPLEMENTATION, LayerSwap, swapped_attention
from .masks import DeferredMask, TEMask
from .report import AttentionEntry, AttentionSwapReport
from .swap import plan_reason, swap_attention, swap_for_plugin, te_unavailable_reason, unswap_attention

__all__ = [
    "IMPLEMENTATION", "AttentionEntry", "AttentionSwapReport", "DeferredMask", "LayerSwap", "ReferenceCore",
    "SinkAttentionCore", "TECore", "TEMask", "plan_reason", "swap_attention", "swap_for_plugin", "swapped_attention",
    "te_unavailable_reason", "te_window", "unswap_attention",
]
