"""Where one training step of the full GPT-OSS-20B spends its time: host (CPU) time per op against GPU kernel time.

A diagnostic for host-bound steps (the brief: profile before tuning kernels). Builds the full architecture on the GPU
in BF16 at random init, applies a LoRA fine-tune with PEFT (attention only, experts frozen; or attention + experts),
runs it through the plugin's swaps and forward context (or plain transformers), and profiles a few steps after
warm-up. Prints the step's wall time, the union of GPU kernel time, the kernel launches, and the ops with the most
host time; writes the tables to ``--out``.

    python3 benchmarks/step_profile.py --out /tmp/prof --recipe bf16 --seq 1024 [--layers 24] [--no-plugin]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch


def build(layers: int, attention: str) -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(num_hidden_layers=layers, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                          num_experts_per_tok=4, sliding_window=128, router_aux_loss_coef=0.0,
                          layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                          tie_word_embeddings=False)
    config._attn_implementation = attention
    config._experts_implementation = "grouped_mm"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.train()


def lora(model: torch.nn.Module, experts: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    kwargs: dict[str, Any] = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if experts else {}
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **kwargs)
    return get_peft_model(model, config)


def kernel_time_ms(events: list[Any]) -> tuple[float, int]:
    """Union of the GPU kernel intervals (overlaps counted once) and the number of kernels."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3, len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="bf16", help="plugin recipe (auto, bf16, fp8_current, ...)")
    parser.add_argument("--no-plugin", action="store_true", help="plain transformers (grouped_mm + --attention)")
    parser.add_argument("--attention", default="eager", help="transformers attention for --no-plugin (flex_attention)")
    parser.add_argument("--experts-lora", action="store_true", help="LoRA on the experts too (target_parameters)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = lora(build(args.layers, args.attention if args.no_plugin else "eager"), args.experts_lora)
    context: Callable[[], Any] = nullcontext
    if not args.no_plugin:
        from lightning_te_moe import TEMoEPrecision

        plugin = TEMoEPrecision(args.recipe, print_plan=False, guard=False)
        plugin.convert_module(model)
        context = plugin.forward_context
        print("plan", plugin.plan.summary(), flush=True)
    print(f"built in {time.time() - t0:.0f} s; allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(0, 201088, (args.batch, args.seq), device="cuda")

    def step() -> None:
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    kernel_ms, launches = kernel_time_ms(prof.events())
    result = {"recipe": "transformers" if args.no_plugin else args.recipe, "seq": args.seq, "batch": args.batch,
              "layers": args.layers, "wall_ms": sorted(walls), "kernel_ms_per_step": kernel_ms / 2,
              "launches_per_step": launches // 2, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(result), flush=True)
    name = f"{result['recipe']}_{args.seq}_{args.layers}l{'_xl' if args.experts_lora else ''}"
    (args.out / f"profile_{name}.json").write_text(json.dumps(result, indent=2))
    averages = prof.key_averages()
    (args.out / f"profile_{name}.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60) + "\n\n"
                                                 + averages.table(sort_by="self_cuda_time_total", row_limit=40))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()
