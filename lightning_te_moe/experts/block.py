"""Replacement for a transformers 4.x sparse-MoE block whose experts are an ``nn.ModuleList`` of MLPs.

4.x blocks loop over ``self.experts[i]`` inside their own forward, so the block itself is replaced: same
routing as 4.x Mixtral / Qwen2-MoE (softmax in fp32, top-k, optional renormalisation, optional sigmoid-gated
shared expert), the experts as one :class:`GroupedExperts`. Router and shared expert are the original modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .module import GroupedExperts


class ModuleListMoEBlock(nn.Module):
    """``forward(hidden_states [B, S, H]) -> (hidden_states, router_logits)``, as the 4.x blocks return."""

    def __init__(self, original: nn.Module, experts: GroupedExperts) -> None:
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
