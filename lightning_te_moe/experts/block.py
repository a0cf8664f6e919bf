"""Replacement for a transformers 4.x sparse-MoE block whose experts are an ``nn.ModuleList`` of MLPs.

4.x blocks loop over ``self.experts[i]`` inside their own forward, so the block itself is replaced: same
routing as 4.x Mixtral / Qwen2-MoE (softmax in fp32, top-k, optional renormalisation, optional sigmoid-gated
shared expert), the experts as one :class:`GroupedExperts`. Router and shared expert are the original modules.
Blocks of that shape route differently (PhiMoE's sparsemixer, say), so :func:`routing_mismatch` runs the
block and this one, with the block's own experts, on probe tokens before anything is swapped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

class ModuleListMoEBlock(nn.Module):
    """``forward(hidden_states [B, S, H]) -> (hidden_states, router_logits)``, as the 4.x blocks return.

    ``experts`` is called as ``experts(x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``: the
    swapped :class:`~lightning_te_moe.experts.GroupedExperts`, or the block's own experts for the probe.
    """

    def __init__(self, original: nn.Module, experts: nn.Module) -> None:
        super().__init__()
        self.gate: nn.Module = original.gate
        self.experts = experts
        self.top_k = int(original.top_k)
        self.norm_topk_prob = bool(getattr(original, "norm_topk_prob", True))  # 4.x Mixtral always renormalises
        self.shared_expert: Optional[nn.Module] = getattr(original, "shared_expert", None)
        self.shared_expert_gate: Optional[nn.Module] = getattr(original, "shared_expert_gate", None)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, selected, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape), router_logits


class _ExpertsOneByOne(nn.Module):
    """A 4.x block's own experts with the grouped module's call signature (the probe's reference)."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                out.index_add_(0, token, (expert(x[token]) * top_k_weights[token, slot, None]).to(x.dtype))
        return out


#: Relative error (Frobenius norm) within which the probe counts the block's output and ours as equal:
#: summation order only; a different routing moves outputs by tens of percent.
PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def routing_mismatch(block: nn.Module, tokens: int = 64) -> Optional[str]:
    """Why :class:`ModuleListMoEBlock` would not reproduce ``block``, or None when it does on probe tokens.

    Both run on the same random hidden states with the block's own router and experts, so only the routing
    and the combination are compared: the output and the router logits, within :data:`PROBE_TOLERANCE`.
    """
    name, weight = type(block).__name__, block.gate.weight
    if weight.is_meta:
        return f"{name}'s weights are on the meta device: its routing cannot be checked; swap after loading them"
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, tokens // 2, weight.size(1), generator=generator).to(weight.device, weight.dtype)
    ours_block = ModuleListMoEBlock(block, _ExpertsOneByOne(block.experts))
    with torch.no_grad():
        try:
            theirs = block(probe)
        except Exception as err:  # noqa: BLE001 - any failure means the block is not the 4.x shape we replace
            return f"{name}.forward(hidden_states) raised {type(err).__name__}: {err}"
        ours = ours_block(probe)
    if not (isinstance(theirs, tuple) and len(theirs) == 2 and all(isinstance(t, Tensor) for t in theirs)
            and all(a.shape == b.shape for a, b in zip(theirs, ours))):
        return f"{name}.forward does not return (hidden_states, router_logits) shaped like the 4.x Mixtral block's"
    errors = [_rel_err(a, b) for a, b in zip(ours, theirs)]
    if max(errors) > PROBE_TOLERANCE.get(weight.dtype, 2e-2):
        renorm = "renormalise" if ours_block.norm_topk_prob else "no renormalisation"
        return (f"{name} routes differently from softmax -> top-{ours_block.top_k} -> {renorm}: on probe tokens"
                f" its output differs from ours by {errors[0]:.2g} and its router logits by {errors[1]:.2g}"
                " (relative)")
    return None


def _rel_err(ours: Tensor, theirs: Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    scale = theirs.norm().item()
    return (ours - theirs).norm().item() / scale if scale else (ours - theirs).norm().item()
