"""``swap_norms`` / ``unswap_norms``: put a model's RMSNorm modules on TE's fused RMSNorm kernels, and back.

Only norms whose math TE's kernel reproduces exactly are swapped: the kernel multiplies the weight in FP32 and
rounds once to the input's dtype. GPT-OSS's RMSNorm does the same (``(weight * x_normed).to(input_dtype)``);
Llama's form, which Mixtral, Qwen-MoE, OLMoE and DeepSeek copy (``weight * x_normed.to(input_dtype)``), rounds
before the multiply, so those stay the model's own (named in the report). Independent of the precision recipe:
a swapped norm runs the same on every rung of the ladder. Runs before the optimizer is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..console import print_rank_zero
from ..experts.gemm import te_available
from ..policy.plan import Plan
from ..policy.state import PrecisionState
from .module import TERMSNorm, is_rms_norm
from .report import NormEntry, NormSwapReport

#: RMSNorm classes whose forward is TE's kernel's math (weight times the FP32 normalized input, one rounding),
#: with where that is written.
ONE_ROUNDING: dict[str, str] = {
    "GptOssRMSNorm": "transformers models/gpt_oss/modeling_gpt_oss.py: (self.weight * hidden_states).to(input_dtype)",
}
#: Why any other RMSNorm stays the model's own.
TWO_ROUNDINGS = ("its forward rounds the normalized input to the input dtype before multiplying by the weight;"
                 " TE's kernel multiplies in FP32 and rounds once: kept, for exactly the original math")


@dataclass
class NormSwapConfig:
    """How to swap (a config plus a module filter, as :class:`~lightning_te_moe.dense.DenseSwapConfig`).

    Args:
        module_filter: ``(module, fully_qualified_name) -> bool``; False keeps that norm as it is.
    """

    module_filter: Optional[Callable[[nn.Module, str], bool]] = None


def plan_reason(plan: Plan) -> Optional[str]:
    """Why the norms stay the model's own in this run, or None."""
    env = plan.environment
    if env.device_type != "cuda":
        return f"device is {env.device_type}: norms stay the model's own (TE's kernels need a GPU)"
    if not env.has_te:
        return "Transformer Engine is not installed: norms stay the model's own"
    if plan.request.get("torch_compile"):
        return ("the model runs under torch.compile, which fuses its RMSNorm itself (TE's kernels would break the"
                " compiled graph at every norm): norms stay the model's own")
    if not te_available():
        return "Transformer Engine does not import in this process: norms stay the model's own"
    return None


def swap_norms(model: nn.Module, config: Optional[NormSwapConfig] = None) -> NormSwapReport:
    """Replace every RMSNorm of ``model`` whose math TE's kernel reproduces by a :class:`TERMSNorm`, in place.

    Returns the report; nothing is printed.
    """
    config = config or NormSwapConfig()
    report = NormSwapReport(type(model).__name__)
    for path, module in list(model.named_modules()):
        name = type(module).__name__
        if isinstance(module, TERMSNorm):
            original = type(module.__dict__["_original"]).__name__
            report.entries.append(NormEntry(path, original, "already swapped"))
            continue
        if not is_rms_norm(module):
            continue
        if name not in ONE_ROUNDING:
            report.entries.append(NormEntry(path, name, "kept", TWO_ROUNDINGS))
            continue
        if config.module_filter is not None and not config.module_filter(module, path):
            report.entries.append(NormEntry(path, name, "kept", "excluded by module_filter"))
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, TERMSNorm(module))
        report.entries.append(NormEntry(path, name, "swapped"))
    return report


def unswap_norms(model: nn.Module) -> int:
    """Put the original RMSNorm modules back, holding the current weights; returns how many."""
    restored = 0
    for path, module in list(model.named_modules()):
        if isinstance(module, TERMSNorm):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module.restore())
            restored += 1
    return restored


def swap_for_plugin(model: nn.Module, state: PrecisionState,
                    config: Optional[NormSwapConfig] = None) -> Optional[tuple[str, dict]]:
    """The plugin's module swap: RMSNorms on TE where this run allows it, else the reason.

    On a CPU plan the reason is printed only (the plugin runs torch there). A model swapped by an earlier setup of
    this run gets the printed line only: there is no new decision.
    """
    reason = plan_reason(state.plan)
    report = NormSwapReport(type(model).__name__, skipped=reason) if reason else swap_norms(model, config)
    new = bool(report.skipped or (report.entries and not report.by_status("already swapped")))
    print_rank_zero(report.render_text() if new else f"[lightning-te-moe] norm swap: {report.summary()}")
    if state.plan.environment.device_type != "cuda" or not new:
        return None
    return report.summary(), report.to_dict()
