"""MoE expert swap: transformers experts -> grouped-GEMM experts (TE ``GroupedLinear`` on CUDA), reversibly."""

from .activations import GLU, ClampedSwiGLU, HFGate, Ungated
from .adapters import (ExpertsAdapter, ExpertsMatch, FusedExpertsAdapter, ModuleListAdapter, NotSwappable,
                       register_adapter, registered_adapters, unregister_adapter)
from .block import ModuleListMoEBlock
from .layouts import ExpertWeights, FusedCodec, ModuleListCodec, WeightCodec
from .module import GroupedExperts, GroupedWeights
from .report import SwapEntry, SwapReport
from .swap import ExpertSwapConfig, fp8_incompatibility, swap_experts, swap_for_plugin, unswap_experts

__all__ = [
    "GLU", "ClampedSwiGLU", "ExpertSwapConfig", "ExpertWeights", "ExpertsAdapter", "ExpertsMatch",
    "FusedCodec", "FusedExpertsAdapter", "GroupedExperts", "GroupedWeights", "HFGate", "ModuleListAdapter",
    "ModuleListCodec", "ModuleListMoEBlock", "NotSwappable", "SwapEntry", "SwapReport", "Ungated", "WeightCodec",
    "fp8_incompatibility", "register_adapter", "registered_adapters", "swap_experts", "swap_for_plugin",
    "unregister_adapter", "unswap_experts",
]
