"""Where one training step of the full GPT-OSS-20B spends its host time, op by op, against its GPU kernel time.

A diagnostic for host-bound steps (profile before tuning kernels), beside ``full_model.py``, whose model, fine-tunes,
conversion and kernel accounting it reuses: one implementation and fine-tune, a few profiled steps after warm-up,
and the ops with the most host (CPU) time. Prints the step's wall time, the union of GPU kernel time and the kernel
launches; writes a JSON summary and the op tables to ``--out``.

    python3 benchmarks/step_profile.py --out /tmp/prof --row plugin-default --seq 1024 [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from full_model import (BY_KEY, FINETUNES, apply_finetune, build_model, convert, gpt_oss_20b_config, kernel_time,
                        trace_events, training_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--row", choices=sorted(BY_KEY), default="plugin-default")
    parser.add_argument("--finetune", choices=sorted(FINETUNES), default="frozen-experts-lora-attn")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    impl = BY_KEY[args.row]
    model = apply_finetune(build_model(gpt_oss_20b_config(args.layers), impl.attention), args.finetune)
    context, info, run, _ = convert(model, impl)
    print(info.get("plan", impl.name), flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    step = training_step(model, context, optimizer, run)
    ids = torch.randint(0, 201088, (args.batch, args.seq), device="cuda")
    for _ in range(3):
        step(ids)
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(ids)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(ids)
        torch.cuda.synchronize()
    busy_us, launches = kernel_time(trace_events(prof))
    result = {"row": args.row, "finetune": args.finetune, "seq": args.seq, "batch": args.batch, "layers": args.layers,
              "wall_ms": sorted(walls), "kernel_ms_per_step": busy_us / 1e3 / 2, "launches_per_step": launches // 2,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **info}
    print(json.dumps(result), flush=True)
    name = f"{args.row}_{args.seq}_{args.layers}l"
    (args.out / f"profile_{name}.json").write_text(json.dumps(result, indent=2))
    averages = prof.key_averages()
    (args.out / f"profile_{name}.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=60) + "\n\n"
                                                 + averages.table(sort_by="self_cuda_time_total", row_limit=40))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()
