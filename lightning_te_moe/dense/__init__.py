"""Dense layers on TE: attention projections, shared experts and dense MLPs on ``te.Linear``, reversibly."""

from .engine import DIM_MULTIPLE, TELinearEngine, dim_multiple, row_alignment, te_runs
from .module import TEDenseLinear
from .report import DenseEntry, DenseSwapReport
from .roles import HIGH_PRECISION_RULE, Classifier, Verdict
from .swap import DenseSwapConfig, plan_dim_multiple, plan_reason, swap_dense, swap_for_plugin, unswap_dense

__all__ = [
    "DIM_MULTIPLE", "HIGH_PRECISION_RULE", "Classifier", "DenseEntry", "DenseSwapConfig", "DenseSwapReport",
    "TEDenseLinear", "TELinearEngine", "Verdict", "dim_multiple", "plan_dim_multiple", "plan_reason",
    "row_alignment", "swap_dense", "swap_for_plugin", "te_runs", "unswap_dense",
]
