"""lightning-te-moe: a Lightning precision plugin for training MoE models with NVIDIA Transformer Engine."""

from .attention import swap_attention, unswap_attention
from .dense import DenseSwapConfig, swap_dense, unswap_dense
from .experts import (
                     ExpertSwapConfig,
                     GroupedExperts,
                     register_adapter,
                     swap_experts,
                     unswap_experts,
)
from .fabric import TEMoEFabricPrecision
from .guard import DivergenceError, DivergenceGuard, GuardConfig
from .interrupt import InterruptCheckpoint
from .norms import NormSwapConfig, swap_norms, unswap_norms
from .plugin import TEMoEPrecision
from .policy import (
                     RECIPE_NAMES,
                     Environment,
                     Plan,
                     PlanError,
                     PrecisionRequest,
                     Reason,
                     RecipeSpec,
                     Rung,
                     make_plan,
                     probe_environment,
)
from .progress import TextProgressBar

__all__ = [
    "RECIPE_NAMES",
    "DenseSwapConfig",
    "DivergenceError",
    "DivergenceGuard",
    "Environment",
    "ExpertSwapConfig",
    "GroupedExperts",
    "GuardConfig",
    "InterruptCheckpoint",
    "NormSwapConfig",
    "Plan",
    "PlanError",
    "PrecisionRequest",
    "Reason",
    "RecipeSpec",
    "Rung",
    "TEMoEFabricPrecision",
    "TEMoEPrecision",
    "TextProgressBar",
    "make_plan",
    "probe_environment",
    "register_adapter",
    "swap_attention",
    "swap_dense",
    "swap_experts",
    "swap_norms",
    "unswap_attention",
    "unswap_dense",
    "unswap_experts",
    "unswap_norms",
]
__version__ = "0.1.0"
