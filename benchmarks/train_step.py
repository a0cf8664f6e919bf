"""Benchmark a full training step of GPT-OSS-20B width cut to 4 layers: transformers vs this plugin.

Hidden 2880, 64 heads, 8 KV heads, head dim 64, 32 experts top-4, vocab 32k, sliding window 128 on
alternate layers, batch 4 x 2048 tokens, BF16 weights, fused AdamW; forward (loss), backward, optimizer step.
Variants: transformers eager / default (grouped_mm) experts on eager attention, and the plugin (its module
swaps and forward context, without a Trainer) with the attention swap on/off, per recipe with the dense layers
on TE (the default) and in BF16 (``swap_dense=False``), with gradient checkpointing, and a frozen-experts
fine-tuning step. Median step time over --steps after --warmup steps; peak memory of the
run. Writes train_step.json to --out; ``--render FILE`` puts its table (and, with ``--attention-core``, the
table of ``benchmarks/attention_core.py``) into docs/performance.md.

    python3 benchmarks/train_step.py --out /tmp/bench [--variants NAME ...] [--steps 10]
    python3 benchmarks/train_step.py --render /tmp/bench/train_step.json [--attention-core /tmp/bench/attention_core.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import traceback
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from doc_section import write_section
from moe_layer import loaded_cublaslt
from te_state import fresh_te_state

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- train_step:begin -->", "<!-- train_step:end -->"
BATCH, SEQ, VOCAB = 4, 2048, 32768


class Variant(NamedTuple):
    name: str
    experts: str  # transformers' experts implementation before any swap
    recipe: Optional[str] = None  # None: plain transformers, no plugin
    attention: bool = False  # the plugin's attention swap
    frozen_experts: bool = False
    dense: bool = True  # the plugin's dense swap (attention projections on te.Linear under quantized recipes)
    checkpointing: bool = False  # transformers' gradient_checkpointing_enable() before the plugin's setup


VARIANTS = [
    Variant("transformers eager", "eager"),
    Variant("transformers default (grouped_mm)", "grouped_mm"),
    Variant("plugin bf16, attention swap off", "eager", "bf16", False),
    Variant("plugin bf16, attention swap on", "eager", "bf16", True),
    Variant("plugin auto, attention swap on", "eager", "auto", True),
    Variant("plugin fp8_current, attention swap on", "eager", "fp8_current", True),
    Variant("plugin fp8_delayed, attention swap on", "eager", "fp8_delayed", True),
    Variant("plugin fp8_block, attention swap on", "eager", "fp8_block", True),
    Variant("plugin fp8_current, attention swap on, dense in BF16", "eager", "fp8_current", True, dense=False),
    Variant("plugin fp8_delayed, attention swap on, dense in BF16", "eager", "fp8_delayed", True, dense=False),
    Variant("plugin fp8_block, attention swap on, dense in BF16", "eager", "fp8_block", True, dense=False),
    Variant("plugin bf16, attention swap on, gradient checkpointing", "eager", "bf16", True, checkpointing=True),
    Variant("plugin fp8_current, attention swap on, gradient checkpointing", "eager", "fp8_current", True,
            checkpointing=True),
    Variant("plugin bf16, attention swap on, experts frozen", "eager", "bf16", True, True),
]


def build(experts: str) -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=VOCAB, hidden_size=2880, intermediate_size=2880, num_hidden_layers=4,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                          num_experts_per_tok=4, sliding_window=128, max_position_embeddings=4096,
                          layer_types=["sliding_attention", "full_attention"] * 2, router_aux_loss_coef=0.0,
                          tie_word_embeddings=False)
    config._attn_implementation = "eager"
    config._experts_implementation = experts
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GptOssForCausalLM(config)
    return model.to(torch.bfloat16).train()


def run(variant: Variant, steps: int, warmup: int = 3) -> dict[str, Any]:
    from contextlib import nullcontext

    model = build(variant.experts)
    if variant.checkpointing:
        model.gradient_checkpointing_enable()
    if variant.frozen_experts:
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.requires_grad_(False)
    context, info = nullcontext, {}
    if variant.recipe is not None:
        from lightning_te_moe import TEMoEPrecision
        from lightning_te_moe.dense import TEDenseLinear

        plugin = TEMoEPrecision(variant.recipe, params_dtype="bfloat16", print_plan=False, guard=False,
                                swap_attention=variant.attention, swap_dense=variant.dense, cuda_graphs=False)
        plugin.convert_module(model)
        context = plugin.forward_context
        swaps = [d.reason for d in plugin.decisions.decisions if d.kind == "swap"]
        info = {"plan": plugin.plan.summary(), "swaps": swaps,
                "dense_on_te": sum(isinstance(m, TEDenseLinear) for m in model.modules())}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step() -> float:
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times, losses = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step())
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = statistics.median(times)
    return {**info, "median_ms": median, "min_ms": min(times), "tokens_per_s": BATCH * SEQ / median * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_loss": float(losses[0]),
            "last_loss": float(losses[-1]), "steps": steps, "warmup": warmup, "times_ms": [round(t, 2) for t in times]}


def versions() -> dict[str, str]:
    import transformers

    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cublaslt": loaded_cublaslt()}
    try:
        import transformer_engine
        import transformer_engine.pytorch as te

        data["te"] = transformer_engine.__version__
        data["cudnn"] = ".".join(map(str, te.get_cudnn_version()))
    except Exception as err:  # noqa: BLE001 - report whatever is missing
        data["te"] = f"unavailable ({err})"
    return data


def render_attention_core(results: dict[str, Any]) -> list[str]:
    lines = ["", f"Attention core alone (`benchmarks/attention_core.py`, {results['device']}, batch 4 x 2048, BF16, "
             "forward + backward, median of 10):", "",
             "| attention | model's own path | TE DotProductAttention |", "|---|---|---|"]
    for r in results["rows"]:
        own = f"{r['eager_ms']:.2f} ms (eager)" if "eager_ms" in r else f"{r['sdpa_ms']:.2f} ms (SDPA)"
        lines.append(f"| {r['case']} | {own} | {r['te_ms']:.2f} ms |")
    return lines


def render(results: dict[str, Any], attention_core: Optional[dict[str, Any]] = None) -> str:
    meta = results["versions"]
    rows = results["rows"]
    base = next((r for r in rows if r["name"].startswith("transformers default") and "median_ms" in r), None)
    lines = [BEGIN, "## Full training step (`benchmarks/train_step.py`)", "",
             f"{meta['device']}, {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"TE {meta.get('te')}, cuDNN {meta.get('cudnn', '?')}, cuBLASLt {meta.get('cublaslt') or 'not recorded'}. "
             "GPT-OSS-20B width cut to 4 layers (hidden 2880, "
             "64 heads, 8 KV heads, head dim 64, 32 experts top-4, vocab 32,768, window 128 on alternate layers), "
             f"batch {BATCH} x {SEQ}, BF16 weights, fused AdamW; median of {rows[0].get('steps', '?')} steps after "
             f"{rows[0].get('warmup', 3)} warm-up steps (per-step times in the raw results); peak = `torch.cuda.max_memory_allocated` over the run. Plugin rows run its module swaps "
             "(the expert swap as committed when this ran, and the attention swap) and forward context without a "
             "Trainer; they run the dense layers (attention projections) on te.Linear unless the row says \"dense in "
             "BF16\" (`swap_dense=False`). Raw results: `benchmarks/train_step_h100.json`, "
             "`benchmarks/attention_core_h100.json`. A diagnostic: its transformers rows run eager attention, and the"
             " headline is the full-size model against transformers with flex attention (the full-model sections).",
             "",
             "| variant | step | tokens/s | vs transformers default | peak memory | loss (first -> last timed step) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        speed = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} ms | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['peak_gib']:.1f} GiB | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    plans = [f"- {r['name']}: plan `{r['plan']}`" for r in rows if r.get("plan")]
    core = render_attention_core(attention_core) if attention_core else []
    return "\n".join([*lines, "", *notes(rows, base), *plans, *core, END])


def notes(rows: list[dict[str, Any]], base: Optional[dict[str, Any]]) -> list[str]:
    """What the table says, computed from it: the attention swap's share, the best step against the target."""
    done = {r["name"]: r for r in rows if "median_ms" in r}
    out = []
    off, on = done.get("plugin bf16, attention swap off"), done.get("plugin bf16, attention swap on")
    if off and on:
        out.append(f"- The attention swap takes the BF16 step from {off['median_ms']:.1f} ms to {on['median_ms']:.1f} ms "
                   f"and peak memory from {off['peak_gib']:.1f} to {on['peak_gib']:.1f} GiB (eager sink attention "
                   "materialises the [batch, heads, seq, seq + 1] logits).")
    full = [r for n, r in done.items() if n.startswith("plugin") and "frozen" not in n]
    if full and base:
        best = min(full, key=lambda r: r["median_ms"])
        out.append(f"- Best full-training plugin step: {best['name']}, {best['tokens_per_s']:,.0f} tokens/s = "
                   f"{base['median_ms'] / best['median_ms']:.2f}x transformers default (target >= 2.5x, >= 62k), peak "
                   f"{best['peak_gib']:.1f} GiB vs {base['peak_gib']:.1f} GiB.")
        slower = [n for n, r in done.items() if "fp8" in n and "checkpointing" not in n and on
                  and r["median_ms"] > on["median_ms"]]
        if slower:
            out.append(f"- Slower than BF16 here: {', '.join(slower)} (`auto` gives the experts the recipe measured "
                       "fastest on the stack: docs/policy.md; `autotune=True` times the shapes).")
    for name, row in done.items():
        bf16_dense = done.get(f"{name}, dense in BF16")
        if bf16_dense:
            out.append(f"- {name.removeprefix('plugin ').split(',')[0]}: dense layers on TE {row['median_ms']:.1f} ms, "
                       f"peak {row['peak_gib']:.1f} GiB vs dense in BF16 {bf16_dense['median_ms']:.1f} ms, "
                       f"peak {bf16_dense['peak_gib']:.1f} GiB ({row.get('dense_on_te', '?')} layers on TE).")
        plain = done.get(name.removesuffix(", gradient checkpointing"))
        if name.endswith("gradient checkpointing") and plain:
            out.append(f"- Gradient checkpointing, {name.removeprefix('plugin ').split(',')[0]}: "
                       f"{row['median_ms']:.1f} ms vs {plain['median_ms']:.1f} ms without "
                       f"(+{row['median_ms'] / plain['median_ms'] - 1:.0%}), peak {row['peak_gib']:.1f} GiB vs "
                       f"{plain['peak_gib']:.1f} GiB.")
    return out



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning, allocator)")
    parser.add_argument("--variants", nargs="*", help="names (or prefixes) of the variants to run; default all")
    parser.add_argument("--render", type=Path, help="only write this results file's table into docs/performance.md")
    parser.add_argument("--attention-core", type=Path, help="with --render: attention_core.json to add")
    args = parser.parse_args()
    if args.render:
        core = json.loads(args.attention_core.read_text()) if args.attention_core else None
        write_section(render(json.loads(args.render.read_text()), core), BEGIN, END)
        return
    chosen = [v for v in VARIANTS if not args.variants or any(v.name.startswith(p) for p in args.variants)]
    rows = []
    for variant in chosen:
        torch.cuda.reset_peak_memory_stats()
        try:
            row = {"name": variant.name, **run(variant, args.steps, args.warmup)}
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
            traceback.print_exc()
            row = {"name": variant.name, "error": f"{type(err).__name__}: {str(err)[:160]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        fresh_te_state()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"versions": versions(), "rows": rows}
    (args.out / "train_step.json").write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
