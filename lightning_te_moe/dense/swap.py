"""``swap_dense`` / ``unswap_dense``: put a model's dense ``nn.Linear`` layers on TE's ``te.Linear``, and back.

Attention projections (q/k/v/o, MLA's), shared experts and dense MLP blocks become :class:`TEDenseLinear`,
holding the very same parameters; routers, the output head and embeddings stay in the compute dtype by rule
(``dense-high-precision-parts``), and so do expert layers (the expert swap's), PEFT adapters and layers whose
dimensions TE's quantized GEMMs cannot take. A PEFT ``lora.Linear`` keeps wrapping the layer: the swap replaces
its ``base_layer``, and makes the LoRA layer's ``merge``/``unmerge`` (which change the base weight through
``.data``, unseen by the quantized-weight cache) drop TE's quantized copy. Runs before the optimizer is built
(the plugin calls it from ``convert_module``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from ..console import print_rank_zero
from ..experts.gemm import te_available
from ..policy.plan import Plan
from ..policy.recipes import TE_CLASSES
from ..policy.state import PrecisionState
from .engine import DIM_MULTIPLE
from .module import TEDenseLinear
from .report import DenseEntry, DenseSwapReport
from .roles import Classifier

#: Weight-dimension multiple without a plan: what TE's FP8 GEMMs need.
FP8_DIM_MULTIPLE = DIM_MULTIPLE["Float8CurrentScaling"]
#: Methods of a PEFT tuner layer that rewrite its base layer's weight in place through ``.data``.
_MERGE_METHODS = ("merge", "unmerge")
_MERGE_HOOKED = "_te_moe_invalidates_on_merge"


@dataclass
class DenseSwapConfig:
    """How to swap (a config plus a module filter, as :class:`~lightning_te_moe.experts.ExpertSwapConfig`).

    Args:
        module_filter: ``(module, fully_qualified_name) -> bool``; False keeps that linear layer as it is.
        cache_quantized_weights: under a quantized recipe, let TE keep a layer's quantized weight while it is
            unchanged (gradient-accumulation micro-batches; a frozen base under LoRA is quantized once); False
            quantizes on every call and keeps no quantized copy between steps.
    """

    module_filter: Optional[Callable[[nn.Module, str], bool]] = None
    cache_quantized_weights: bool = True


@dataclass
class SwapOrigin:
    """Kept on the replacement (not as a submodule) so :func:`unswap_dense` can put the original back."""

    original: nn.Linear


def plan_dim_multiple(plan: Optional[Plan]) -> int:
    """The weight-dimension multiple every quantized dense recipe of the plan's ladder can run."""
    if plan is None:
        return FP8_DIM_MULTIPLE
    names = [TE_CLASSES[r.dense.name] for r in plan.ladder if r.dense.is_te]
    return max((DIM_MULTIPLE[n] for n in names), default=FP8_DIM_MULTIPLE)


def plan_reason(plan: Plan) -> Optional[str]:
    """Why the plan keeps dense layers on torch, or None."""
    env = plan.environment
    if env.device_type != "cuda":
        return f"device is {env.device_type}: dense layers run in torch (TE needs a GPU)"
    if not env.has_te:
        return "Transformer Engine is not installed: dense layers stay torch nn.Linear"
    if not any(r.dense.is_te for r in plan.ladder):
        return (f"no rung of the plan ({plan.summary()}) runs a quantized dense recipe: te.Linear would run the same"
                " GEMM as nn.Linear")
    if not te_available():
        return "Transformer Engine does not import in this process: dense layers stay torch nn.Linear"
    return None


def swap_dense(model: nn.Module, config: Optional[DenseSwapConfig] = None, *, plan: Optional[Plan] = None,
               module_filter: Optional[Callable[[nn.Module, str], bool]] = None) -> DenseSwapReport:
    """Replace every dense ``nn.Linear`` of ``model`` that may run on TE by a :class:`TEDenseLinear`, in place.

    ``plan``: the weight dimensions must suit every quantized dense recipe of its ladder (without one: FP8's 16).
    Returns the report; nothing is printed.
    """
    config = config or DenseSwapConfig()
    classifier = Classifier(model, plan_dim_multiple(plan), module_filter or config.module_filter)
    report = DenseSwapReport(type(model).__name__)
    for path, module in list(classifier.modules.items()):
        name = type(module).__name__
        if isinstance(module, TEDenseLinear):
            module.cache_quantized_weights = config.cache_quantized_weights
            _invalidate_on_merge(classifier.parent(path), module)
            report.entries.append(DenseEntry(path, name, "already swapped", classifier.role(path), "", "",
                                             module.in_features, module.out_features))
            continue
        if not isinstance(module, nn.Linear):
            verdict = classifier.other(path, module)
            if verdict is not None:
                report.entries.append(DenseEntry(path, name, "kept", verdict.role, verdict.reason, verdict.rule))
            continue
        verdict = classifier.linear(path, module)
        status = "kept" if verdict.reason else "swapped"
        if status == "swapped":
            layer = TEDenseLinear.from_linear(module, config.cache_quantized_weights)
            layer._swap_origin = SwapOrigin(module)
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, child, layer)
            _invalidate_on_merge(parent, layer)
        report.entries.append(DenseEntry(path, name, status, verdict.role, verdict.reason, verdict.rule,
                                         module.in_features, module.out_features))
    return report


def _merged(method: Callable[..., Any], layer: TEDenseLinear, *args: Any, **kwargs: Any) -> Any:
    layer.release_quantized_weights()  # a frozen base parked on the host comes back to take the merge
    try:
        return method(*args, **kwargs)
    finally:
        layer.invalidate_quantized_weights()


def _invalidate_on_merge(parent: Optional[nn.Module], layer: TEDenseLinear) -> None:
    """Where ``parent`` is a PEFT tuner layer around ``layer``: its merge/unmerge also drop TE's quantized weight."""
    if parent is None or getattr(parent, "base_layer", None) is not layer or _MERGE_HOOKED in parent.__dict__:
        return
    if not all(callable(getattr(parent, name, None)) for name in _MERGE_METHODS):
        return
    for name in _MERGE_METHODS:
        parent.__dict__[name] = functools.partial(_merged, getattr(parent, name), layer)
    parent.__dict__[_MERGE_HOOKED] = True


def unswap_dense(model: nn.Module) -> int:
    """Put the original ``nn.Linear`` layers back, holding the current parameters; returns how many."""
    restored = 0
    for path, module in list(model.named_modules()):
        origin: Optional[SwapOrigin] = getattr(module, "_swap_origin", None)
        if not isinstance(module, TEDenseLinear) or origin is None:
            continue
        original = origin.original
        module.release_quantized_weights()  # a frozen weight parked on the host comes back first
        original.weight = module.weight
        original.bias = module.bias
        original.train(module.training)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if parent.__dict__.pop(_MERGE_HOOKED, False):
            for name in _MERGE_METHODS:
                parent.__dict__.pop(name, None)
        setattr(parent, child, original)
        restored += 1
    return restored


def swap_for_plugin(model: nn.Module, state: PrecisionState,
                    config: Optional[DenseSwapConfig] = None) -> Optional[tuple[str, dict]]:
    """The plugin's module swap: dense layers on TE where the plan and this process allow it, else the reason.

    On a CPU plan the reason is printed only (the plugin runs torch there; the plan already says so). A model
    swapped by an earlier setup of this run gets the printed line only: there is no new decision.
    """
    reason = plan_reason(state.plan)
    report = DenseSwapReport(type(model).__name__, skipped=reason) if reason else swap_dense(model, config,
                                                                                           plan=state.plan)
    new = bool(report.skipped or (report.entries and not report.by_status("already swapped")))
    print_rank_zero(report.render_text() if new else f"[lightning-te-moe] dense swap: {report.summary()}")
    if state.plan.environment.device_type != "cuda" or not new:
        return None
    return report.summary(), report.to_dict()
