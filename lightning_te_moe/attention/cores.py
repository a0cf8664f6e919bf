"""Attention cores: TE ``DotProductAttention`` (``softmax_type="learnable"`` for GPT-OSS sinks, ``"vanilla"``
for standard causal attention), and a torch reference of the same math.

Both take q/k/v as the model hands them ([batch, heads, seq, dim], RoPE applied), the model's own ``sinks``
tensor (None: no sinks), the sliding window (None: full causal) and ``key_valid`` (None: no padding, else right padding as
[batch, seq] booleans), and return [batch, seq, heads, dim]. Rows of padding queries come back as zeros
(as transformers' FlashAttention path does); real tokens never attend to them.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor, nn


class AttentionCore(Protocol):
    def __call__(self, query: Tensor, key: Tensor, value: Tensor, sinks: Optional[Tensor], scaling: float,
                 window: Optional[int], key_valid: Optional[Tensor]) -> Tensor: ...


def te_window(window: Optional[int]) -> tuple[int, int]:
    """transformers masks key j for query i when i - j >= window; TE's window_size (left, right) is inclusive."""
    return (-1, 0) if window is None else (window - 1, 0)


class TECore:
    """One TE ``DotProductAttention`` per device and scale, built on the first call.

    Built lazily because Lightning converts the module before moving it to the GPU. The DPA is kept out of
    the model's module tree (the model's state dict keys do not change); its ``softmax_offset`` is the
    model's ``sinks`` tensor itself, set on every call, so the sinks are trained in place in the HF layout.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sinks: bool = True) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.softmax_type = "learnable" if sinks else "vanilla"
        self._modules: dict[tuple[torch.device, float], nn.Module] = {}

    def _dpa(self, device: torch.device, scaling: float) -> nn.Module:
        key = (device, scaling)
        if key not in self._modules:
            import transformer_engine.pytorch as te

            with torch.cuda.device(device):
                dpa = te.DotProductAttention(self.num_heads, self.head_dim, num_gqa_groups=self.num_kv_heads,
                                             attention_dropout=0.0, qkv_format="bshd", attn_mask_type="causal",
                                             softmax_scale=scaling, softmax_type=self.softmax_type)
            self._modules[key] = dpa
        return self._modules[key]

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, sinks: Optional[Tensor], scaling: float,
                 window: Optional[int], key_valid: Optional[Tensor]) -> Tensor:
        dpa = self._dpa(query.device, scaling)
        if sinks is not None:
            dpa._parameters["softmax_offset"] = sinks  # TE reads self.softmax_offset in forward
        # under autocast RoPE's fp32 cos/sin promote q and k to fp32 while v stays BF16; eager attention's matmuls
        # run in the autocast dtype, TE needs one dtype for all three
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
        q, k, v = (t.transpose(1, 2).to(dtype).contiguous() for t in (query, key, value))
        if key_valid is None:
            out = dpa(q, k, v, attn_mask_type="causal", window_size=te_window(window))
        else:
            out = dpa(q, k, v, attention_mask=~key_valid[:, None, None, :], attn_mask_type="padding_causal",
                      window_size=te_window(window))
        out = out.reshape(q.shape)
        return out if key_valid is None else out * key_valid[:, :, None, None].to(out.dtype)


class ReferenceCore:
    """TE's attention (with or without sinks) written in torch: checks the swap's wiring on machines without TE."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sinks: bool = True) -> None:
        self.groups = num_heads // num_kv_heads

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, sinks: Optional[Tensor], scaling: float,
                 window: Optional[int], key_valid: Optional[Tensor]) -> Tensor:
        b, h, s, _ = query.shape
        k, v = key.repeat_interleave(self.groups, dim=1), value.repeat_interleave(self.groups, dim=1)
        logits = (query.float() @ k.float().transpose(2, 3)) * scaling
        pos = torch.arange(s, device=query.device)
        distance = pos[:, None] - pos[None, :]
        allowed = (distance >= 0) if window is None else (distance >= 0) & (distance < window)
        allowed = allowed[None, None] if key_valid is None else allowed[None, None] & key_valid[:, None, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sinks is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            sink = sinks.float().reshape(1, h, 1, 1).expand(b, h, s, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        out = (probs.to(v.dtype) @ v).transpose(1, 2)
        return out if key_valid is None else out * key_valid[:, :, None, None].to(out.dtype)
