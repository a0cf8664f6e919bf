"""lightning-te-moe: a Lightning precision plugin for training MoE models with NVIDIA Transformer Engine."""

from .attention import swap_attention, unswap_attention
from .environment import Environment, probe_environment
from .experts import ExpertSwapConfig, GroupedExperts, register_adapter, swap_experts, unswap_experts
from .guard import DivergenceError, DivergenceGuard
from .guard_config import GuardConfig
from .plan import Plan, Reason, Rung
from .plugin import TEMoEPrecision
from .policy import PlanError, PrecisionRequest, make_plan
from .recipes import RECIPE_NAMES, RecipeSpec

__all__ = [
    "RECIPE_NAMES",
    "DivergenceError",
    "DivergenceGuard",
    "Environment",
    "ExpertSwapConfig",
    "GroupedExperts",
    "GuardConfig",
    "Plan",
    "PlanError",
    "PrecisionRequest",
    "Reason",
    "RecipeSpec",
    "Rung",
    "TEMoEPrecision",
    "make_plan",
    "probe_environment",
    "register_adapter",
    "swap_attention",
    "swap_experts",
    "unswap_attention",
    "unswap_experts",
]
__version__ = "0.1.0"
