"""Where the memory of a full-size GPT-OSS-20B LoRA step goes, eager or with CUDA graphs (a diagnostic).

Builds ``full_model.py``'s model and fine-tune (experts frozen, LoRA on attention) under the plugin's default plan,
runs --steps steps of batch 1 x --seq, and prints per step the memory allocated before it and its peak. With torch's
allocator history on, it then sums the live blocks at the end of the last step (or at an out-of-memory error) by
memory pool (the general one, or a CUDA graphs' private pool) and by the innermost frame of this package, TE,
transformers or PEFT that allocated them: what a graphed step holds that an eager one does not. At an out-of-memory
error it takes that account at the moment of the failure too (torch's out-of-memory observer, before the failed step's
frames are released), and the memory reserved but free, by pool and CUDA stream (a block freed on one stream is
reused only by allocations on that stream: each layer captures on its own side stream).

    python3 benchmarks/graph_memory.py --seq 4096 --graphs
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
from full_model import Implementation, apply_finetune, build_model, convert, gpt_oss_20b_config, training_step

OWNERS = ("lightning_te_moe", "transformer_engine", "transformers", "peft", "torch/autograd", "torch/optim")


def owner(frames: list[dict[str, Any]]) -> str:
    """The innermost frame in one of :data:`OWNERS`, as ``path:line name``."""
    for frame in frames:
        name = frame.get("filename", "")
        for key in OWNERS:
            if key in name:
                return f"{name[name.index(key):]}:{frame.get('line')} {frame.get('name')}"
    return "other"


def live_blocks(snapshot: dict[str, Any]) -> Counter[tuple[str, str]]:
    """Bytes of live blocks by (pool, allocating frame)."""
    out: Counter[tuple[str, str]] = Counter()
    for segment in snapshot["segments"]:
        pool = pool_name(segment)
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                out[(pool, owner(block.get("frames", [])))] += block["size"]
    return out


def pool_name(segment: dict[str, Any]) -> str:
    return "general" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "graph pool"


def free_by_stream(snapshot: dict[str, Any]) -> Counter[tuple[str, int]]:
    """Bytes reserved by the allocator but not allocated, by (pool, stream)."""
    out: Counter[tuple[str, int]] = Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "inactive":
                out[(pool_name(segment), segment.get("stream", 0))] += block["size"]
    return out


def report(snapshot: dict[str, Any], top: int) -> None:
    free = free_by_stream(snapshot)
    print(f"reserved but free: {sum(free.values()) / 2**30:.2f} GiB in {len(free)} (pool, stream) pairs; largest:",
          {f"{pool} stream {stream}": f"{size / 2**30:.2f} GiB" for (pool, stream), size in free.most_common(5)})
    blocks = live_blocks(snapshot)
    pools: Counter[str] = Counter()
    for (pool, _), size in blocks.items():
        pools[pool] += size
    print("live by pool:", {k: f"{v / 2**30:.2f} GiB" for k, v in pools.items()})
    for (pool, where), size in blocks.most_common(top):
        print(f"  {size / 2**30:7.2f} GiB  {pool:10s}  {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--graphs", action="store_true", help="the plugin's cuda_graphs=True")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    config = gpt_oss_20b_config(24)
    model = apply_finetune(build_model(config, "eager"), "frozen-experts-lora-attn")
    impl = Implementation("diag", "diagnostic", "eager", "auto", cuda_graphs=args.graphs)
    context, info, run, _ = convert(model, impl)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    step = training_step(model, context, optimizer, run)
    if args.graphs:  # memory after each layer's capture
        from lightning_te_moe.graphs import dispatchers

        for index, dispatcher in enumerate(dispatchers(model)):
            dispatcher.on_event = lambda kind, text, evidence, index=index: print(
                f"  layer {index} {kind}: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device="cuda")
    print("plan:", info["plan"], "| graphs:", args.graphs, "| seq:", args.seq)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    at_failure: list[dict[str, Any]] = []
    observe = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if observe is not None:  # the account at the failure, while the failed step still holds its memory
        observe(lambda *_: at_failure.append(torch.cuda.memory._snapshot()))
    try:
        for i in range(args.steps):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(ids)
            torch.cuda.synchronize()
            print(f"step {i + 1}: allocated before {before / 2**30:.2f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f}"
                  f" GiB, after {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
    except torch.cuda.OutOfMemoryError as err:
        print(f"out of memory at step {i + 1}: {str(err).splitlines()[0][:200]}")
    if at_failure:
        print("at the out-of-memory error:")
        report(at_failure[0], args.top)
        print("after the failed step was released:")
    report(torch.cuda.memory._snapshot(), args.top)


if __name__ == "__main__":
    main()
