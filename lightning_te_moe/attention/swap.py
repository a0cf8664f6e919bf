"""``swap_attention`` / ``unswap_attention``: put attention cores on TE fused attention, and back.

Only the attention core changes: the model's q/k/v/o projections, RoPE, ``sinks`` parameter and state dict
stay where they are. GPT-OSS sink attention runs TE's learnable softmax (43 -> 3.1 ms per layer on an H100);
standard causal attention (Mixtral, Qwen3-MoE) runs TE's vanilla softmax, measured faster than their SDPA
path on an H100 (2.35 -> 2.11 and 2.30 -> 1.77 ms per layer at 4 x 2048; docs/performance.md). Attention
whose query/key and value head sizes differ (DeepSeek's MLA) stays the model's own.
"""

from __future__ import annotations

import inspect
from typing import Literal, Optional

from torch import nn

from ..console import print_rank_zero
from ..policy.plan import Plan
from ..policy.rules import RULES
from ..policy.state import PrecisionState
from .cores import ReferenceCore, TECore
from .dispatch import IMPLEMENTATION, SWAP_ATTR, LayerSwap, register
from .report import AttentionEntry, AttentionSwapReport

CoreName = Literal["te", "reference"]
#: Original implementations whose masks the fallback can rebuild (GPT-OSS trains on eager only).
FALLBACK_IMPLEMENTATIONS = ("eager", "sdpa")
_MLA_KEPT = "query/key and value head sizes differ (multi-head latent attention): stays the model's own"


def _is_swappable_attention(module: nn.Module) -> bool:
    """An attention module that calls transformers' attention interface with one head size for q, k and v."""
    return (type(module).__name__.endswith("Attention") and hasattr(module, "config")
            and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")))


def _is_other_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(module, "o_proj") and not _is_swappable_attention(module)


def _has_sinks(module: nn.Module) -> bool:
    return isinstance(getattr(module, "sinks", None), nn.Parameter)


def te_unavailable_reason() -> Optional[str]:
    """Why TE's learnable-softmax attention cannot be used in this process, or None."""
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # noqa: BLE001 - any import failure means: no TE attention
        return f"Transformer Engine does not import ({type(err).__name__}: {err})"
    if "softmax_type" not in inspect.signature(te.DotProductAttention.__init__).parameters:
        return "this TE's DotProductAttention has no softmax_type (learnable sinks); verified with TE 2.20.2"
    return None


def plan_reason(plan: Plan) -> Optional[str]:
    """Why the plan keeps attention on the model's own path, or None."""
    env = plan.environment
    if env.device_type != "cuda":
        return f"device is {env.device_type}: attention stays the model's own"
    if not env.has_te:
        return "Transformer Engine is not installed: attention stays the model's own"
    if not plan.fused_attention:
        off = {r.id for r in RULES if r.effect.fused_attention is False}
        why = next((f"{r.text} [{r.rule}; {r.ref}]" for r in plan.reasons if r.rule in off), "")
        return "the plan keeps attention off TE's fused backend" + (f": {why}" if why else "")
    return None


def swap_attention(model: nn.Module, *, core: CoreName = "te") -> AttentionSwapReport:
    """Swap every attention layer of ``model`` that calls transformers' attention interface with one head size
    (GPT-OSS sink attention, standard causal attention) to ``core``, in place; returns the report.

    All layers sharing a config are swapped together (the config names the implementation).
    ``core="reference"`` runs the same math in torch, for checking the wiring without TE.
    """
    report = AttentionSwapReport(type(model).__name__)
    by_config: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        if _is_swappable_attention(module):
            by_config.setdefault(id(module.config), []).append((path, module))
        elif _is_other_attention(module):
            report.entries.append(AttentionEntry(path, type(module).__name__, "kept", _MLA_KEPT))
    for layers in by_config.values():
        config = layers[0][1].config
        original = config._attn_implementation or "eager"
        if original == IMPLEMENTATION:
            report.entries += [AttentionEntry(p, type(m).__name__, "already swapped") for p, m in layers]
            continue
        if original not in FALLBACK_IMPLEMENTATIONS:
            why = f"attn_implementation {original!r}: only eager/sdpa models are swapped (their masks are rebuilt on fallback)"
            report.entries += [AttentionEntry(p, type(m).__name__, "kept", why) for p, m in layers]
            continue
        register()
        for path, module in layers:
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            cls = TECore if core == "te" else ReferenceCore
            sinks = _has_sinks(module)
            module.__dict__[SWAP_ATTR] = LayerSwap(cls(heads, kv_heads, module.head_dim, sinks=sinks), core, original)
            window = getattr(module, "sliding_window", None)
            kind = "learnable softmax (sinks)" if sinks else "vanilla softmax"
            detail = f"{kind}, " + (f"sliding window {window}" if window else "full causal")
            report.entries.append(AttentionEntry(path, type(module).__name__, "swapped", detail, core))
        config._attn_implementation = IMPLEMENTATION
    return report


def unswap_attention(model: nn.Module) -> int:
    """Give every swapped layer its original attention back; returns how many were restored."""
    restored = 0
    for module in model.modules():
        swap: Optional[LayerSwap] = module.__dict__.pop(SWAP_ATTR, None)
        if swap is not None:
            module.config._attn_implementation = swap.original_implementation
            restored += 1
    return restored


def swap_for_plugin(model: nn.Module, state: PrecisionState) -> Optional[tuple[str, dict]]:
    """The plugin's module swap: TE attention where the plan and this process allow it, else the reason.

    On a CPU plan the reason is printed only: the plan (recorded at setup) already says attention is the
    model's own there, so there is no decision to record. Elsewhere the report becomes a decision.
    """
    reason = plan_reason(state.plan) or te_unavailable_reason()
    report = AttentionSwapReport(type(model).__name__, skipped=reason or "") if reason else swap_attention(model)
    print_rank_zero(report.render_text())
    if state.plan.environment.device_type != "cuda":
        return None
    return report.summary(), report.to_dict()

