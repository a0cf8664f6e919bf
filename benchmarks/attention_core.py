"""Benchmark the attention core alone (forward + backward, BF16, batch 4 x 2048): the evidence for which
attention the plugin swaps.

- GPT-OSS-20B sink attention (64 heads, 8 KV heads, dim 64; full and window 128): transformers' eager math vs
  TE ``DotProductAttention(softmax_type="learnable")``.
- Standard causal GQA attention at Mixtral-8x7B (32/8 heads, dim 128) and Qwen3-30B-A3B (32/4, dim 128)
  shapes: torch SDPA (what those models use by default) vs TE ``DotProductAttention``.

    python3 benchmarks/attention_core.py --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable, Optional

import torch

B, S = 4, 2048


def timed(fn: Callable[[], torch.Tensor], steps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def qkv(heads: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(0)
    make = lambda h: torch.randn(B, h, S, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def eager_sink(heads: int, kv_heads: int, dim: int, window: Optional[int]) -> Callable[[], torch.Tensor]:
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = qkv(heads, kv_heads, dim)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True,
                             sinks=torch.zeros(heads, device="cuda", dtype=torch.bfloat16, requires_grad=True))
    pos = torch.arange(S, device="cuda")
    d = pos[:, None] - pos[None, :]
    allowed = (d >= 0) if window is None else (d >= 0) & (d < window)
    mask = torch.zeros(S, S, device="cuda", dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    mask = mask[None, None].expand(B, 1, S, S)

    def step() -> torch.Tensor:
        out, _ = eager_attention_forward(module, q, k, v, mask, scaling=dim ** -0.5)
        out.sum().backward()
        return out
    return step


def te_attention(heads: int, kv_heads: int, dim: int, window: Optional[int], sinks: bool) -> Callable[[], torch.Tensor]:
    import transformer_engine.pytorch as te

    from lightning_te_moe.attention import te_window

    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in qkv(heads, kv_heads, dim))
    dpa = te.DotProductAttention(heads, dim, num_gqa_groups=kv_heads, qkv_format="bshd", attn_mask_type="causal",
                                 window_size=te_window(window), softmax_type="learnable" if sinks else "vanilla")

    def step() -> torch.Tensor:
        out = dpa(q, k, v)
        out.sum().backward()
        return out
    return step


def sdpa(heads: int, kv_heads: int, dim: int) -> Callable[[], torch.Tensor]:
    q, k, v = qkv(heads, kv_heads, dim)

    def step() -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()
        return out
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    rows = []
    for window in (None, 128):
        label = f"GPT-OSS sink attention 64/8 x 64, {'full' if window is None else 'window 128'}"
        rows.append({"case": label, "eager_ms": timed(eager_sink(64, 8, 64, window)),
                     "te_ms": timed(te_attention(64, 8, 64, window, sinks=True))})
    for name, heads, kv_heads, dim in (("Mixtral-8x7B causal 32/8 x 128", 32, 8, 128),
                                       ("Qwen3-30B-A3B causal 32/4 x 128", 32, 4, 128)):
        rows.append({"case": name, "sdpa_ms": timed(sdpa(heads, kv_heads, dim)),
                     "te_ms": timed(te_attention(heads, kv_heads, dim, None, sinks=False))})
    for row in rows:
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_core.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
