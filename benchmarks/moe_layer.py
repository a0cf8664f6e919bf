"""Benchmark one GPT-OSS-20B expert layer (H=2880, I=2880, E=32, top-4), forward + backward, BF16 activations.

Compares transformers' eager and grouped_mm experts with the swapped GroupedExperts in BF16 (TE and torch
backends) and under every FP8 recipe the device runs: trainable experts with one micro-batch per optimizer step
(TE quantizes the weights on every forward), micro-batches 2..n of a step (TE reuses its quantized weights), and
frozen experts (fine-tuning: no weight gradients, weights quantized once). Reports the median step time over
>= 10 steps after warm-up, the peak memory of the step, and the output error against transformers' eager experts,
then checks the issues' speed targets on the same run (:mod:`moe_targets`: met, or missed by how much). Records the
CUDA stack (cuBLASLt decides TE's GEMM path: one GEMM per expert, or its native grouped GEMM from 13.4) and the path
TE takes for each recipe. Writes ``moe_layer.json`` (to --out) and the markdown table with the targets into the
stack's own section of ``docs/performance.md`` (one section per cuBLASLt major.minor, so both stacks stay shown).

    python3 benchmarks/moe_layer.py --out /tmp/bench [--tokens 4096 16384 65536] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from doc_section import DOC, write_section
from moe_targets import GRAPHED, PER_EXPERT, check_targets, targets_json, targets_markdown
from te_state import fresh_te_state
from torch import Tensor, nn

H, I, E, TOP_K = 2880, 2880, 32, 4
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("bf16", "fp8_delayed", "fp8_current", "fp8_block")


def hf_experts(implementation: str) -> nn.Module:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    module = GptOssExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.cuda().to(torch.bfloat16)


def ours(base: nn.Module, recipe: str, backend: str, cache: bool = False, frozen: bool = False) -> nn.Module:
    """The swapped layer; ``cache``: TE may reuse its quantized weights (the timed steps never change them, so
    this is micro-batches 2..n of an optimizer step); ``frozen``: every expert parameter frozen."""
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.experts import ExpertSwapConfig, swap_experts
    from lightning_te_moe.policy.plan import Plan, Rung
    from lightning_te_moe.policy.recipes import RecipeSpec
    from lightning_te_moe.policy.state import PrecisionState

    holder = nn.Module()
    holder.experts = copy.deepcopy(base)
    rung = Rung(RecipeSpec.of("bf16"), RecipeSpec.of(recipe))
    state = PrecisionState(Plan(ladder=(rung,), environment=Environment()))
    report = swap_experts(holder, ExpertSwapConfig(backend=backend, cache_quantized_weights=cache), state=state)
    assert len(report.swapped) == 1, report.render_text()
    holder.experts.requires_grad_(not frozen)
    return holder.experts


def routing(tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, E, device="cuda", generator=gen)
    top, index = torch.topk(logits, TOP_K, dim=-1)
    return x, index, torch.softmax(top, dim=-1).to(torch.bfloat16)


def training_step(module: nn.Module, tokens: int) -> tuple[Callable[[], Tensor], tuple[Tensor, Tensor, Tensor]]:
    """One forward + backward of ``module`` on fixed routed inputs (returned beside it), gradients cleared first (as
    ``zero_grad`` does in training: each step's gradients are assigned, not added to the last step's)."""
    x, index, weights = routing(tokens)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    grad = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(7))

    def step() -> Tensor:
        for p in module.parameters():
            p.grad = None
        x.grad = weights.grad = None
        out = module(x, index, weights)
        out.backward(grad)
        return out

    return step, (x, index, weights)


def measure(module: nn.Module, tokens: int, steps: int, warmup: int = 3) -> dict[str, Any]:
    step, (x, index, weights) = training_step(module, tokens)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    with torch.no_grad():
        final = module(x, index, weights).float()
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "peak_gib": peak / 2**30,
            "step_extra_gib": (peak - before) / 2**30, "output": final, "steps": steps}


def profile(module: nn.Module, tokens: int, path: Path, steps: int = 3) -> None:
    """Where a fwd+bwd step's time goes: wall time against summed kernel time and launches per step (a step whose
    kernels fill less than its wall time is host-bound), then the kernels and the host ops by their time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, _ = training_step(module, tokens)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    kernel_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    averages = prof.key_averages()
    path.write_text(
        f"per step: wall {wall_ms:.2f} ms (profiler on), kernels {kernel_ms:.2f} ms, {len(kernels) / steps:.0f} kernel"
        f" launches, GPU busy {kernel_ms / wall_ms:.0%}\n\n" + idle_gaps(kernels, steps) + "\n\n"
        + averages.table(sort_by="cuda_time_total", row_limit=40) + "\n\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=30))


def idle_gaps(kernels: list[Any], steps: int, top: int = 15) -> str:
    """Where the GPU waits for the host: the idle gaps between consecutive kernels (per step, summed over the
    kernel pair that brackets them), largest first."""
    gaps: dict[tuple[str, str], list[float]] = {}
    for before, after in zip(kernels, kernels[1:]):
        gap = after.time_range.start - before.time_range.end
        if gap > 5:
            gaps.setdefault((before.name[:50], after.name[:50]), []).append(gap)
    total = sum(sum(v) for v in gaps.values()) / steps / 1e3
    lines = [f"GPU idle between kernels: {total:.2f} ms per step (gaps > 5 us)", "ms/step  count/step  before -> after"]
    for (before, after), values in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(values) / steps / 1e3:7.3f}  {len(values) / steps:10.1f}  {before} -> {after}")
    return "\n".join(lines)


def candidates() -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
    import transformer_engine.pytorch as te

    out: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
        ("HF eager", lambda base: _with_impl(base, "eager")),
        ("HF grouped_mm", lambda base: _with_impl(base, "grouped_mm")),
        ("ours BF16 (TE GroupedLinear)", lambda base: ours(base, "bf16", "te")),
        ("ours BF16 (torch grouped_mm)", lambda base: ours(base, "bf16", "torch")),
        ("ours BF16 (default backend: grouped_mm up to 8,192 tokens off TE's native path)",
         lambda base: ours(base, "bf16", "auto")),
    ]
    recipes = (["fp8_delayed", "fp8_current"] if te.is_fp8_available() else []) + (
        ["fp8_block"] if te.is_fp8_block_scaling_available() else [])
    for recipe in recipes:  # never MXFP8/NVFP4 where the device lacks them: a failed entry poisons TE's state
        out.append((f"ours {recipe}", lambda base, r=recipe: ours(base, r, "te")))
        out.append((f"ours {recipe}, cached weights (micro-batch 2+)",
                    lambda base, r=recipe: ours(base, r, "te", True)))
    out.append(("ours BF16 (TE), frozen experts", lambda base: ours(base, "bf16", "te", True, True)))
    for recipe in recipes:
        out.append((f"ours {recipe}, frozen experts", lambda base, r=recipe: ours(base, r, "te", True, True)))
    # The layer as the plugin's CUDA graphs replay it (where it makes no host sync: TE's native grouped GEMM).
    out.append((f"ours BF16 (TE GroupedLinear){GRAPHED}", lambda base: graphed(ours(base, "bf16", "te"))))
    for recipe in [r for r in recipes if r != "fp8_delayed"]:  # delayed scaling never runs the native path
        out.append((f"ours {recipe}{GRAPHED}", lambda base, r=recipe: graphed(ours(base, r, "te"))))
        out.append((f"ours {recipe}, frozen experts{GRAPHED}",
                    lambda base, r=recipe: graphed(ours(base, r, "te", True, True))))
    # Where the trainable weights go to TE as one grouped weight: the same layers with one weight per expert, for
    # the A/B in the same run.
    for recipe in [r for r in recipes if grouped_weight_here(r)]:
        out.append((f"ours {recipe}{PER_EXPERT}", lambda base, r=recipe: per_expert(ours(base, r, "te"))))
        out.append((f"ours {recipe}{PER_EXPERT}{GRAPHED}",
                    lambda base, r=recipe: graphed(per_expert(ours(base, r, "te")))))
    return out


def grouped_weight_here(recipe: str) -> bool:
    """Whether the trainable layer binds its weights as TE's one grouped weight under ``recipe`` on this stack."""
    from lightning_te_moe.experts.gemm import grouped_weight_applies
    from lightning_te_moe.policy.recipes import RecipeSpec

    return grouped_weight_applies(RecipeSpec.of(recipe).build(), torch.bfloat16)


def per_expert(module: nn.Module) -> nn.Module:
    """``module`` with its TE engines binding one weight per expert (TE quantizes them one by one), as before the
    grouped weight: its forward runs with ``TEGroupedGemm.grouped_weight_runs`` answering no."""
    from unittest import mock

    from lightning_te_moe.experts.gemm import TEGroupedGemm

    forward = module.forward

    def one_weight_per_expert(*args: Any, **kwargs: Any) -> Any:
        with mock.patch.object(TEGroupedGemm, "grouped_weight_runs", lambda *_: False):
            return forward(*args, **kwargs)

    module.forward = one_weight_per_expert
    return module


def graphed(module: nn.Module) -> nn.Module:
    """``module`` behind the plugin's CUDA-graph dispatcher (captured at the third call, replayed after)."""
    from lightning_te_moe.graphs import LayerGraphs

    module.forward = LayerGraphs(module)
    return module


def graph_refusal(module: nn.Module) -> Optional[str]:
    """Why a graphed row ran eagerly (its layer synchronizes on this stack), else None."""
    from lightning_te_moe.graphs import graph_status

    status = graph_status(module)
    if not status["layers"] or status["graphed"]:
        return None
    return "; ".join(status["refused"]) or "never captured"


def _with_impl(base: nn.Module, implementation: str) -> nn.Module:
    module = copy.deepcopy(base)
    module.config = copy.deepcopy(base.config)
    module.config._experts_implementation = implementation
    return module


def environment() -> dict[str, Any]:
    """The run's stack: device, versions, cuBLASLt (as TE reads it and as the loaded library reports it), and the
    GEMM path TE takes for each recipe here (TE's own predicate)."""
    import transformer_engine
    import transformers

    from lightning_te_moe.experts.gemm import native_grouped_gemm
    from lightning_te_moe.policy.environment import probe_environment
    from lightning_te_moe.policy.recipes import RecipeSpec

    env = probe_environment()
    paths = {name: "native" if native_grouped_gemm(RecipeSpec.of(name).build(), torch.bfloat16) else "split"
             for name in RECIPES}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformer_engine": transformer_engine.__version__, "transformers": transformers.__version__,
            "cuda": str(torch.version.cuda), "cublaslt": env.cublaslt_version, "cublaslt_loaded": loaded_cublaslt(),
            "cudnn": env.cudnn_version, "gemm_paths": paths, "probe": env.to_dict(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def loaded_cublaslt() -> Optional[str]:
    """``cublasLtGetVersion()`` of the libcublasLt this process loaded (131000: 13.10.0), or None."""
    import ctypes

    for name in ("libcublasLt.so.13", "libcublasLt.so.12"):
        try:
            value = int(ctypes.CDLL(name).cublasLtGetVersion())
        except OSError:
            continue
        return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"
    return None


def stack_key(cublaslt: Optional[str]) -> str:
    """The doc section a run writes: one per cuBLASLt major.minor (``cublaslt-13.10``)."""
    return "cublaslt-" + (".".join((cublaslt or "unknown").split(".")[:2]))


def markers(stack: str) -> tuple[str, str]:
    return f"<!-- moe_layer:{stack}:begin -->", f"<!-- moe_layer:{stack}:end -->"


def last_section_end(doc: Path = DOC) -> Optional[str]:
    """The end marker of the doc's last expert-layer section (a new stack's section goes right after it)."""
    found = re.findall(r"<!-- moe_layer:[^:>]+:end -->", doc.read_text()) if doc.exists() else []
    return found[-1] if found else None


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], tokens: list[int], targets: list[str]) -> str:
    names = list(dict.fromkeys(r["name"] for r in rows))
    cell = {(r["name"], r["tokens"]): r for r in rows}
    head = ["| implementation | " + " | ".join(f"T={t:,} ms (peak GiB, rel err)" for t in tokens) + " |",
            "|---|" + "---|" * len(tokens)]
    body = []
    for name in names:
        parts = []
        for t in tokens:
            r: Optional[dict[str, Any]] = cell.get((name, t))
            parts.append("n/a" if r is None else f"{r['median_ms']:.1f} ({r['peak_gib']:.1f}, {r['rel_err']:.1e})")
        body.append(f"| {name} | " + " | ".join(parts) + " |")
    paths = ", ".join(f"{name} {'native grouped GEMM' if path == 'native' else 'one GEMM per expert'}"
                      for name, path in env["gemm_paths"].items())
    meta = (f"Measured {env['date']} on {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), "
            f"cuBLASLt {env['cublaslt']} (loaded library: {env['cublaslt_loaded']}), cuDNN {env['cudnn']}, "
            f"Transformer Engine {env['transformer_engine']}, transformers {env['transformers']}. "
            f"TE's GEMM path for the experts on this stack: {paths}. "
            f"GPT-OSS-20B expert layer H={H}, I={I}, E={E}, top-{TOP_K}, BF16 weights and activations, forward + "
            f"backward (weights, input and routing weights), median of {rows[0]['steps']} steps after 3 warm-up, "
            "TE's global FP8 state reset between rows; "
            "peak = max allocated during the timed steps; rel err = ||out - HF eager|| / ||HF eager||.")
    begin, end = markers(stack_key(env["cublaslt"]))
    title = f"## MoE expert layer (`benchmarks/moe_layer.py`), cuBLASLt {env['cublaslt']}"
    return "\n".join([begin, title, "", meta, "", *head, *body, "",
                      "**Targets**, checked by the benchmark on this run (`benchmarks/moe_targets.py`):", "", *targets,
                      end])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--profile", type=int, default=0, help="also profile ours (TE) at this many tokens")
    parser.add_argument("--profile-recipe", default="bf16", help="the recipe --profile runs (default bf16)")
    parser.add_argument("--profile-frozen", action="store_true", help="--profile the frozen-experts layer")
    parser.add_argument("--only", nargs="+", default=None,
                        help="measure only implementations whose name contains one of these (rel err is then "
                             "against the first one measured, and the doc is left alone)")
    args = parser.parse_args()
    env = environment()
    print(f"cuBLASLt {env['cublaslt']} (loaded: {env['cublaslt_loaded']}), TE {env['transformer_engine']}, "
          f"GEMM paths {env['gemm_paths']}", flush=True)
    base = hf_experts("eager")
    rows: list[dict[str, Any]] = []
    for tokens in args.tokens:
        reference: Optional[Tensor] = None
        for name, build in candidates():
            if args.only and not any(part in name for part in args.only):
                continue
            module = build(base)
            result = measure(module, tokens, args.steps)
            output = result.pop("output")
            refused = graph_refusal(module)
            if refused is not None:
                print(f"T={tokens:>6} {name:<32} not graphed here ({refused}): row left out", flush=True)
                del module, output
                fresh_te_state()
                continue
            reference = output if reference is None else reference
            err = ((output - reference).norm() / reference.norm()).item()
            rows.append({"name": name, "tokens": tokens, **result, "rel_err": err})
            print(f"T={tokens:>6} {name:<32} {result['median_ms']:8.2f} ms (min {result['min_ms']:.2f}, max"
                  f" {result['max_ms']:.2f})  peak {result['peak_gib']:6.2f} GiB  step +{result['step_extra_gib']:6.2f}"
                  f" GiB  rel err {err:.2e}", flush=True)
            del module, output
            fresh_te_state()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        frozen = "_frozen" if args.profile_frozen else ""
        profile(ours(base, args.profile_recipe, "te", args.profile_frozen, args.profile_frozen), args.profile,
                args.out / f"moe_layer_profile_{args.profile_recipe}{frozen}.txt")
    from lightning_te_moe.policy.environment import Environment

    targets = check_targets(rows, Environment.from_dict(env["probe"]))
    (args.out / "moe_layer.json").write_text(json.dumps({"environment": env, "results": rows,
                                                         "targets": targets_json(targets)}, indent=2))
    text = markdown(env, rows, args.tokens, targets_markdown(targets))
    (args.out / "moe_layer.md").write_text(text + "\n")
    if not args.only:
        write_section(text, *markers(stack_key(env["cublaslt"])), after=last_section_end())
    print(text)


if __name__ == "__main__":
    main()
