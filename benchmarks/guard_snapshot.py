"""Measure the divergence guard's snapshots at full size: GPT-OSS-20B (24 layers, vocab 201,088, BF16 weights,
experts frozen) on one GPU, through the plugin's module swaps and forward context (no Trainer), fused AdamW.

Fine-tunes: ``lora``, PEFT LoRA r=16 on attention q/k/v/o (the usual GPT-OSS recipe: the adapters and their
AdamW state are all that changes); ``attention``, attention + embeddings + head trainable (1.8B parameters,
issue 12's fine-tune). For each, at batch 1 x --seq tokens: the step time without snapshots; the step time with
a snapshot after every step, taken exactly as the guard takes one (the trainable state into reused pinned host
buffers with ``non_blocking`` copies on a side stream; the next optimizer step waits for the copy's event on the
device); one snapshot's host time, copy time and bytes; one restore; and the interval the guard chooses
(``SnapshotCadence``, 2% budget) with its share of step time. Writes guard_snapshot.json to --out and prints the
table for docs/divergence-guard.md.

    python3 benchmarks/guard_snapshot.py --out /tmp/bench [--finetunes lora attention] [--seq 1024] [--steps 20]
    python3 benchmarks/guard_snapshot.py --tiny --out /tmp/bench     # a 2-layer model: checks the script on a CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_te_moe.guard.cadence import SnapshotCadence
from lightning_te_moe.guard.snapshot import SnapshotStore

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(tiny: bool, device: torch.device) -> torch.nn.Module:
    """The GPT-OSS-20B architecture, random weights, built on the device in BF16 (no FP32 detour)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    layers = 2 if tiny else 24
    config = GptOssConfig(vocab_size=1024 if tiny else 201_088, hidden_size=256 if tiny else 2880,
                          intermediate_size=256 if tiny else 2880, num_hidden_layers=layers,
                          num_attention_heads=8 if tiny else 64, num_key_value_heads=2 if tiny else 8, head_dim=64,
                          num_local_experts=4 if tiny else 32, num_experts_per_tok=2 if tiny else 4,
                          sliding_window=128, max_position_embeddings=131_072,
                          layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                          router_aux_loss_coef=0.0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def prepare(finetune: str, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with only the fine-tune's parameters trainable, through the plugin's swaps (as at Trainer setup)."""
    from lightning_te_moe import TEMoEPrecision

    model = build(tiny, device)
    model.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(any(k in name for k in ("self_attn", "embed_tokens", "lm_head")))
    plugin = TEMoEPrecision("bf16", params_dtype="bfloat16", print_plan=False, guard=False)
    plugin.convert_module(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, {"plugin": plugin, "plan": plugin.plan.summary(), "trainable": trainable,
                   "trainable_params": sum(p.numel() for p in trainable),
                   "total_params": sum(p.numel() for p in model.parameters())}


def timed_steps(model: torch.nn.Module, info: dict[str, Any], ids: torch.Tensor, steps: int, warmup: int,
                store: SnapshotStore | None) -> dict[str, Any]:
    """Wall time per step over ``steps`` steps (one sync at the end, so a copy may overlap the next step);
    with ``store``, a snapshot after every step as the guard takes it."""
    optimizer = torch.optim.AdamW(info["trainable"], lr=1e-5, fused=True)
    context = info["plugin"].forward_context
    device_sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def step(i: int) -> None:
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if store is not None:
            store.wait_before_update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if store is not None:
            store.verify(i - 1)  # the guard verifies step i - 1's copy with step i's values
            store.capture(i, model, [optimizer], [], None, verified=False)

    for i in range(warmup):
        step(i)
    device_sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    device_sync()
    out: dict[str, Any] = {"step_ms": (time.perf_counter() - start) / steps * 1e3}
    if store is not None:
        costs = [cost for cost, _ in store.finished_costs()]
        copies = [s for s in (store.good, store.candidate) if s is not None]
        out.update(snapshot_ms=statistics.median(costs) if costs else None,
                   host_ms=statistics.median(s.host_ms for s in copies),
                   snapshot_bytes=copies[0].nbytes, pinned_host_bytes=store.nbytes,
                   pinned=all(t.is_pinned() for t in copies[0].tensors.values()) if ids.is_cuda else None)
        device_sync()
        begin = time.perf_counter()
        store.restore(model, [optimizer], [], None)
        device_sync()
        out["restore_ms"] = (time.perf_counter() - begin) * 1e3
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if ids.is_cuda else None
    return out


def run(finetune: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, info = prepare(finetune, args.tiny, device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    plain = timed_steps(model, info, ids, args.steps, args.warmup, None)
    snap = timed_steps(model, info, ids, args.steps, args.warmup, SnapshotStore())
    cadence = SnapshotCadence(None, 0.02)
    cadence.add_step(plain["step_ms"])
    cadence.add_snapshot(snap["snapshot_ms"] or snap["host_ms"], snap["snapshot_bytes"])
    cadence.interval = cadence.proposal()
    return {"finetune": finetune, "plan": info["plan"], "trainable_params": info["trainable_params"],
            "total_params": info["total_params"], "seq": args.seq, "steps": args.steps,
            "step_ms": plain["step_ms"], "step_with_snapshot_every_step_ms": snap["step_ms"],
            "overhead_every_step": snap["step_ms"] / plain["step_ms"] - 1, **{k: v for k, v in snap.items()
                                                                             if k not in ("step_ms",)},
            "chosen": cadence.stats()}


def render(results: dict[str, Any]) -> str:
    meta = results["versions"]
    lines = [f"{meta['device']}, {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}. "
             f"GPT-OSS-20B architecture, BF16 weights, experts frozen, batch 1 x {results['rows'][0]['seq']}, fused "
             f"AdamW, plan {results['rows'][0]['plan']}; `benchmarks/guard_snapshot.py`.", "",
             "| fine-tune | trainable | snapshot (per copy) | host / copy time | step | step, snapshot every step |"
             " restore | chosen interval | its share of step time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        copy_ms = (r["snapshot_ms"] - r["host_ms"]) if r["snapshot_ms"] is not None else float("nan")
        every = r["step_with_snapshot_every_step_ms"]
        lines.append(f"| {r['finetune']} | {r['trainable_params'] / 1e6:,.1f} M | {r['snapshot_bytes'] / 2**20:,.0f}"
                     f" MiB | {r['host_ms']:.1f} / {copy_ms:.1f} ms | {r['step_ms']:.1f} ms | {every:.1f} ms"
                     f" ({r['overhead_every_step']:+.1%}) | {r['restore_ms']:.0f} ms | {r['chosen']['interval']} |"
                     f" {r['chosen']['cost_share']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--finetunes", nargs="*", default=["lora", "attention"], choices=["lora", "attention"])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (checks the script, e.g. on a CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    rows = []
    for finetune in args.finetunes:
        rows.append(run(finetune, args, device))
        print(json.dumps(rows[-1], default=str))
        gc.collect()  # the model and its plugin hold references to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    results = {"versions": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guard_snapshot.json").write_text(json.dumps(results, indent=1, default=str))
    print(render(results))


if __name__ == "__main__":
    main()
