"""RMSNorm on TE's fused kernels: one kernel forward and one backward in place of transformers' elementwise chain."""

from .kernel import TERMSNormFunction, te_rmsnorm
from .module import TERMSNorm, is_rms_norm
from .report import NormEntry, NormSwapReport
from .swap import ONE_ROUNDING, NormSwapConfig, plan_reason, swap_for_plugin, swap_norms, unswap_norms

__all__ = [
    "ONE_ROUNDING", "NormEntry", "NormSwapConfig", "NormSwapReport", "TERMSNorm", "TERMSNormFunction", "is_rms_norm",
    "plan_reason", "swap_for_plugin", "swap_norms", "te_rmsnorm", "unswap_norms",
]
