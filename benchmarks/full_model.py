"""Benchmark LoRA fine-tuning steps of the full GPT-OSS-20B architecture: transformers vs this plugin, on one GPU.

The model is GPT-OSS-20B's configuration (24 layers, hidden 2880, 64 heads, 8 KV heads, head dim 64, 32 experts
top-4, vocab 201,088, window 128 on alternate layers, YaRN rope; router aux loss off, untied head) at random init,
built on the GPU in BF16. Implementations (``--rows``): transformers grouped_mm experts + flex attention (the
reference: what GPT-OSS users run), transformers + eager attention, and the plugin (its module swaps and forward
context, without a Trainer) with its default plan and in BF16, both starting from the eager-attention model; the
default plan also with dense layers left in BF16 (issue 15), with transformers' gradient checkpointing, and with
transformers' own RMSNorm in place of TE's fused one (``plugin-default-model-norms``). The plugin
rows keep its ``cuda_graphs`` default, which on one GPU with TE replays the decoder layers as CUDA graphs (they need
3 warm-up steps); the ``-eager`` rows turn them off (``cuda_graphs=False``).
Fine-tunes (``--finetunes``): experts frozen + PEFT LoRA r=16 on q/k/v/o_proj, and PEFT LoRA also on the experts
(``target_parameters``); PEFT is applied before the plugin converts the model, fused AdamW on what trains.

Every (implementation, fine-tune) runs in its own child process, which builds the model once and loops over the
shapes (``--shapes``; an out-of-memory shape is recorded and the next one runs). Per shape: step time (CUDA events
around forward + backward + optimizer step) median / min / max, tokens/s, peak memory over the timed steps, memory
after setup, host time of a step, and from 2 profiled steps the CUDA kernel time (union of kernel intervals on the
device timeline) and launches per step; GPU busy = kernel time / median step. The targets of issue 12 are checked on
the same stack (:mod:`full_model_targets`). Writes ``full_model.json`` and ``full_model.md`` to --out after every
child, and a section per ``--stack-label`` into docs/performance.md.

    python3 benchmarks/full_model.py --out /tmp/bench --stack-label "cuBLASLt 13.1" [--rows flex plugin-default]
        [--finetunes frozen-experts-lora-attn] [--shapes 1x1024 1x4096] [--append /tmp/bench/full_model.json]
    python3 benchmarks/full_model.py --layers 2 --out /tmp/smoke --stack-label smoke       # quick check
    python3 benchmarks/full_model.py --render a/full_model.json b/full_model.json          # merge, write docs (no GPU)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import gc
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from doc_section import DOC, write_section
from full_model_targets import REFERENCE, SHAPES, check_targets, outcome, shape_label, speedup
from moe_targets import targets_json, targets_markdown
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 24
PROFILED_STEPS = 2
#: Steps before a CUDA-graph row replays (lightning_te_moe.graphs.WARMUP_CALLS eager calls, then the capture).
GRAPH_WARMUP = 3
#: Result fields that identify a CUDA stack: two calls under one --stack-label should agree on them.
STACK_FIELDS = ("device", "torch", "cuda", "transformers", "peft", "te", "cudnn", "cublaslt", "memory_cap_gib")


class Implementation(NamedTuple):
    key: str
    name: str
    attention: str  # transformers' attention implementation the model is built with
    recipe: Optional[str]  # the plugin's recipe; None: plain transformers
    swap_dense: bool = True  # the plugin's swap_dense: False leaves the dense layers in BF16 (issue 15's comparison)
    cuda_graphs: Optional[bool] = None  # the plugin's cuda_graphs: None lets its plan decide (on, one GPU with TE)
    checkpointing: bool = False  # transformers' gradient_checkpointing_enable() (non-reentrant) before the plugin
    swap_norms: bool = True  # the plugin's swap_norms: False keeps transformers' RMSNorm (the fused norms' A/B)

    @property
    def graphed(self) -> bool:
        """The plugin may replay CUDA graphs here (its plan's default on one GPU with TE): the row needs their warm-up
        and reports which layers replayed."""
        return self.recipe is not None and self.cuda_graphs is not False


IMPLEMENTATIONS = (
    Implementation(REFERENCE, "transformers grouped_mm + flex attention", "flex_attention", None),
    Implementation("eager", "transformers grouped_mm + eager attention", "eager", None),
    Implementation("plugin-default", "plugin default plan", "eager", "auto"),
    Implementation("plugin-bf16", "plugin bf16", "eager", "bf16"),
    Implementation("plugin-default-dense-bf16", "plugin default plan, dense layers left in BF16", "eager", "auto",
                   swap_dense=False),
    Implementation("plugin-default-eager", "plugin default plan, CUDA graphs off", "eager", "auto", cuda_graphs=False),
    Implementation("plugin-bf16-eager", "plugin bf16, CUDA graphs off", "eager", "bf16", cuda_graphs=False),
    Implementation("plugin-default-checkpointing", "plugin default plan, gradient checkpointing", "eager", "auto",
                   checkpointing=True),
    Implementation("plugin-default-model-norms", "plugin default plan, transformers' RMSNorm", "eager", "auto",
                   swap_norms=False),
)
BY_KEY = {impl.key: impl for impl in IMPLEMENTATIONS}
ATTENTION_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_LORA = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FINETUNES = {
    "frozen-experts-lora-attn": "experts frozen, LoRA r=16 on q/k/v/o_proj",
    "lora-attn-experts": "LoRA r=16 on q/k/v/o_proj and on the experts (PEFT `target_parameters`)",
}


# -- the child: one implementation and fine-tune, every shape ---------------------------------------------------
def gpt_oss_20b_config(layers: int) -> Any:
    """GPT-OSS-20B's architecture (transformers' GptOssConfig defaults are gpt-oss-20b's where not given here)."""
    from transformers import GptOssConfig

    return GptOssConfig(num_hidden_layers=layers, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
                        hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, sliding_window=128, router_aux_loss_coef=0.0, tie_word_embeddings=False,
                        use_cache=False)


def build_model(config: Any, attention: str) -> nn.Module:
    """The model on the GPU in BF16, without transformers' weight init (a 21B-parameter init pass is slow)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device("cuda"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention,
                                                 experts_implementation="grouped_mm")
    fill_weights(model)
    return model.train()


@torch.no_grad()
def fill_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random init where the parameters live: norms 1, biases 0, every other weight N(0, std)."""
    generator: Optional[torch.Generator] = None
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif "norm" in name:
            param.fill_(1.0)
        else:
            generator = generator or torch.Generator(param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=generator)


def apply_finetune(model: nn.Module, finetune: str) -> nn.Module:
    """PEFT LoRA as users set it up; PEFT freezes everything else (the experts too, unless targeted)."""
    from peft import LoraConfig, get_peft_model

    extra = {"target_parameters": EXPERT_LORA} if finetune == "lora-attn-experts" else {}
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION_LORA, **extra))


Runner = Callable[[Callable[[], Tensor]], Tensor]


def convert(model: nn.Module, impl: Implementation) -> tuple[Callable[[], AbstractContextManager], dict[str, Any],
                                                             Runner, Callable[[], list[dict[str, Any]]]]:
    """The plugin's swaps, forward context and out-of-memory fallback (its ``optimizer_step`` runs the step's closure
    through it), as Lightning would run them; plain transformers runs as it is. Also returns a function giving the
    memory decisions so far (the rung taken, ``to``, and the decision's evidence: the allocator's memory at the
    failure and after the rung).

    The plugin keeps its defaults: the trainable adapters become FP32 master weights, the frozen BF16 base stays
    BF16 (``params_dtype`` applies to trainable parameters).
    """
    if impl.recipe is None:
        return nullcontext, {}, lambda closure: closure(), list
    from lightning_te_moe import TEMoEPrecision

    plugin = TEMoEPrecision(impl.recipe, print_plan=False, guard=False, swap_dense=impl.swap_dense,
                            swap_norms=impl.swap_norms, cuda_graphs=impl.cuda_graphs)
    plugin.convert_module(model)
    assert plugin.plan is not None
    info = {"plan": plugin.plan.summary(), "swaps": [d.reason for d in plugin.decisions.decisions if d.kind == "swap"]}
    def memory() -> list[dict[str, Any]]:
        return [{"to": d.to, **d.evidence} for d in plugin.decisions.decisions if d.kind == "memory"]

    return plugin.forward_context, info, lambda closure: plugin.memory.run(closure, model), memory


def training_step(model: nn.Module, context: Callable[[], AbstractContextManager], optimizer: torch.optim.Optimizer,
                  run: Runner) -> Callable[[Tensor], Tensor]:
    """One optimizer step; forward and backward run as a closure through ``run`` (the plugin's memory fallback)."""
    def step(ids: Tensor) -> Tensor:
        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)  # inside: a step run again after out of memory starts clean
            with context():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()

        loss = run(closure)
        optimizer.step()
        return loss

    return step


def time_steps(step: Callable[[Tensor], Tensor], ids: Tensor, steps: int, warmup: int) -> dict[str, Any]:
    """Step times (CUDA events), host time per step, peak memory over the timed steps, first and last loss."""
    losses = [step(ids) for _ in range(warmup)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        losses.append(step(ids))
        host.append((time.perf_counter() - begin) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = statistics.median(times)
    first, last = float(losses[0]), float(losses[-1])
    return {"median_ms": median, "min_ms": min(times), "max_ms": max(times), "times_ms": [round(t, 2) for t in times],
            "tokens_per_s": ids.numel() / median * 1e3, "host_ms": statistics.median(host),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_loss": first, "last_loss": last,
            "finite": math.isfinite(first) and math.isfinite(last)}


def kernel_time(trace_events: list[dict[str, Any]], only: Optional[Callable[[str], bool]] = None) -> tuple[float, int]:
    """Microseconds some kernel ran (the union of kernel intervals: concurrent streams count once), and launches;
    ``only``: count just the kernels whose name it accepts (NCCL's, say)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace_events if e.get("cat") == "kernel" and "dur" in e
                   and (only is None or only(e.get("name", ""))))
    busy, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy, len(spans)


def trace_events(profiler: Any) -> list[dict[str, Any]]:
    """The events of a finished ``torch.profiler`` run, as its Chrome trace holds them."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        return json.loads(trace.read_text())["traceEvents"]


def profile_steps(step: Callable[[Tensor], Tensor], ids: Tensor) -> dict[str, Any]:
    """Kernel time and launches per step over profiled steps (the profiler slows the host, so the busy share
    divides by the unprofiled median step instead of these steps' own time, kept as ``profiled_step_ms``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(PROFILED_STEPS):
            step(ids)
        end.record()
        torch.cuda.synchronize()
    busy_us, launches = kernel_time(trace_events(prof))
    if not launches:  # CUPTI missing or refused: an empty profile must not read as an idle GPU
        raise RuntimeError("the profile recorded no CUDA kernel")
    return {"kernel_ms": busy_us / 1e3 / PROFILED_STEPS, "launches": launches // PROFILED_STEPS,
            "profiled_step_ms": start.elapsed_time(end) / PROFILED_STEPS}


def failure_status(err: BaseException) -> str:
    """``oom`` for any out-of-memory (torch's allocator, or a library's own allocation), else ``error``."""
    return "oom" if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower() else "error"


def describe(err: BaseException) -> str:
    """The exception's type and first line, safe inside a markdown table."""
    text = str(err).strip().replace("|", "/")
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def memory_breakdown(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the allocator's reserved memory sits (``torch.cuda.memory_snapshot()``), by stream and pool (a CUDA
    graph's private pool, or the allocator's own): reserved, allocated and the largest free block, in GiB. Memory
    reserved on one stream or pool is not handed to another: an out-of-memory error with much reserved but
    unallocated says where to look."""
    groups: dict[tuple[Any, Any], dict[str, Any]] = {}
    for seg in segments:
        pool = tuple(seg.get("segment_pool_id") or (0, 0))
        key = (seg.get("stream", 0), pool)
        group = groups.setdefault(key, {"stream": key[0], "pool": "allocator" if pool == (0, 0) else f"graph {pool}",
                                        "segments": 0, "reserved_gib": 0.0, "allocated_gib": 0.0,
                                        "largest_free_gib": 0.0})
        free = [b["size"] for b in seg.get("blocks", ()) if b.get("state") == "inactive"]
        group["segments"] += 1
        group["reserved_gib"] += seg["total_size"] / 2**30
        group["allocated_gib"] += seg["allocated_size"] / 2**30
        group["largest_free_gib"] = max(group["largest_free_gib"], max(free, default=0) / 2**30)
    rows = sorted(groups.values(), key=lambda g: -g["reserved_gib"])
    for group in rows:
        for name in ("reserved_gib", "allocated_gib", "largest_free_gib"):
            group[name] = round(group[name], 2)
    return rows


def _site(frames: list[dict[str, Any]]) -> str:
    """Where a block was allocated: the first two Python frames outside torch (innermost first), ``file:line``."""
    ours = [f for f in frames if "/torch/" not in f.get("filename", "/torch/") and f.get("line", 0) > 0][:2]
    return " < ".join(f"{'/'.join(Path(f['filename']).parts[-2:])}:{f['line']} {f['name']}" for f in ours) or "unknown"


def pinning_sites(segments: list[dict[str, Any]], min_free_mib: int = 64, top: int = 12) -> dict[str, Any]:
    """After a failed step, once its tensors are gone and the cache emptied: the allocator's segments that stay
    reserved with free space in them (at least ``min_free_mib``), and the live blocks that keep them, by where they
    were allocated (torch's memory history must be on for the frames: ``--memory-history``). Free memory the cache
    cannot give back is pinned by these allocations."""
    sites: dict[str, dict[str, Any]] = {}
    free_total, pinned = 0, 0
    for index, seg in enumerate(segments):
        blocks = seg.get("blocks", ())
        free = sum(b["size"] for b in blocks if b.get("state") == "inactive")
        if tuple(seg.get("segment_pool_id") or (0, 0)) != (0, 0) or free < min_free_mib * 2**20:
            continue
        free_total, pinned = free_total + free, pinned + 1
        for block in blocks:
            if block.get("state") != "active_allocated":
                continue
            site = sites.setdefault(_site(block.get("frames") or []), {"blocks": 0, "bytes": 0, "segments": set()})
            site["blocks"] += 1
            site["bytes"] += block["size"]
            site["segments"].add(index)
    rows = sorted(sites.items(), key=lambda item: -item[1]["bytes"])[:top]
    return {"segments": pinned, "free_gib": round(free_total / 2**30, 2),
            "sites": [{"site": name, "blocks": s["blocks"], "gib": round(s["bytes"] / 2**30, 3),
                       "segments": len(s["segments"])} for name, s in rows]}


def measure_shape(step: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, shape: str, steps: int,
                  warmup: int, vocab: int) -> dict[str, Any]:
    batch, seq = parse_shape(shape)
    result: dict[str, Any] = {"shape": shape}
    try:
        ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        result.update(status="ok", **time_steps(step, ids, steps, warmup))
        try:
            result.update(profile_steps(step, ids))
            result["gpu_busy"] = result["kernel_ms"] / result["median_ms"]
        except Exception as err:  # noqa: BLE001 - the timings stand without the profile
            result["profile_error"] = describe(err)
    except Exception as err:  # noqa: BLE001 - record the shape (out of memory or not) and go on to the next
        traceback.print_exc()
        result = {"shape": shape, "status": failure_status(err), "error": describe(err)}
        if result["status"] == "oom":  # while the failed step's tensors are still held
            result["memory_at_failure"] = memory_breakdown(torch.cuda.memory_snapshot())
            print(f"[full_model] {shape}: memory at the failure: {result['memory_at_failure']}", flush=True)
    # Outside the except block: the traceback (and the activations its frames hold) is gone by now.
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    if result["status"] == "oom":
        result["pinned_after_failure"] = pinning_sites(torch.cuda.memory_snapshot())
        print(f"[full_model] {shape}: pinned after the failure: {result['pinned_after_failure']}", flush=True)
    return result


def run_child(impl: Implementation, finetune: str, shapes: list[str], steps: int, warmup: int, layers: int,
              result_file: Path, memory_cap_gib: Optional[float] = None, memory_history: bool = False) -> None:
    """Build, fine-tune setup, convert, then every shape; one JSON line per stage, flushed as it completes."""
    if memory_history:  # the live blocks' allocation frames, for pinning_sites (current state only: cheap)
        torch.cuda.memory._record_memory_history(enabled="state", stacks="python")
    if memory_cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * 2**30 / total))
    with result_file.open("a") as out:
        def emit(kind: str, **data: Any) -> None:
            out.write(json.dumps({"kind": kind, **data}) + "\n")
            out.flush()

        device = torch.cuda.get_device_name()
        begin = time.perf_counter()
        try:
            config = gpt_oss_20b_config(layers)
            model = apply_finetune(build_model(config, impl.attention), finetune)
            if impl.checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            context, info, run, memory = convert(model, impl)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
        except Exception as err:  # noqa: BLE001 - the parent records it for every shape
            traceback.print_exc()
            emit("setup_error", device=device, status=failure_status(err), error=describe(err))
            return
        torch.cuda.synchronize()
        emit("setup", device=device, setup_s=round(time.perf_counter() - begin, 1),
             setup_gib=torch.cuda.memory_allocated() / 2**30, trainable=sum(p.numel() for p in trainable), **info)
        step = training_step(model, context, optimizer, run)
        for shape in shapes:
            taken = len(memory())
            result = measure_shape(step, optimizer, shape, steps, warmup, config.vocab_size)
            decisions = memory()[taken:]
            if decisions:  # out of memory at this shape: the rungs the plugin took, and its memory
                result["memory"] = [decision["to"] for decision in decisions if decision["to"]]
                result["memory_decisions"] = decisions
            if impl.graphed:
                from lightning_te_moe.graphs import drop_graphs, graph_status

                result["graphs"] = graph_status(model)  # how many layers replayed, and why the others did not
                drop_graphs(model)  # the next shape's graphs do not sit beside this one's
                gc.collect()
                torch.cuda.empty_cache()
                result["graphs"]["allocated_after_drop_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
            print(f"[full_model] {impl.name} | {finetune} | {shape}: {outcome(result)}", flush=True)
            emit("shape", **result)
        emit("environment", environment=environment(memory_cap_gib))


def cublaslt_text(version: int) -> str:
    """``cublasLtGetVersion()`` as text: 131000 -> 13.10.0, 130100 -> 13.1.0."""
    return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"


def cublaslt_version() -> str:
    """The cuBLASLt this process runs (the loaded library answers for its soname)."""
    for name in ("libcublasLt.so.13", "libcublasLt.so.12"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        return cublaslt_text(lib.cublasLtGetVersion())
    return "unavailable (no libcublasLt.so.13 or .12)"


def environment(memory_cap_gib: Optional[float] = None) -> dict[str, str]:
    """Versions of everything in the step (and the memory cap, if any); read after the measurements so TE's import
    cannot change them."""
    import peft
    import transformers

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
           "transformers": transformers.__version__, "peft": peft.__version__, "cublaslt": cublaslt_version(),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if memory_cap_gib is not None:
        env["memory_cap_gib"] = f"{memory_cap_gib:g}"
    try:
        import transformer_engine
        import transformer_engine.pytorch as te

        env["te"] = transformer_engine.__version__
        env["cudnn"] = ".".join(map(str, te.get_cudnn_version()))  # torch's cudnn.version() raises once TE loaded
    except Exception as err:  # noqa: BLE001 - report whatever is missing
        env["te"] = f"unavailable ({describe(err)[:120]})"
        env["cudnn"] = str(torch.backends.cudnn.version()) if "transformer_engine" not in sys.modules else "?"
    return env


# -- the parent: one child per (implementation, fine-tune), results merged and rendered --------------------------
def parse_shape(shape: str) -> tuple[int, int]:
    """``"8x1024"`` -> (8, 1024)."""
    batch, seq = shape.split("x")
    return int(batch), int(seq)


def child_command(impl: str, finetune: str, args: argparse.Namespace, result_file: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", impl, finetune, "--shapes", *args.shapes,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--layers", str(args.layers),
            "--result-file", str(result_file),
            *(["--memory-cap-gib", f"{args.memory_cap_gib:g}"] if args.memory_cap_gib is not None else []),
            *(["--memory-history"] if args.memory_history else [])]


def child_env(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The parent's environment, with the repository importable (``lightning_te_moe``) and output unbuffered."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The child's JSON lines; a line cut short by a killed child is dropped."""
    lines = []
    for text in path.read_text().splitlines() if path.exists() else []:
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def collect(lines: list[dict[str, Any]], impl: Implementation, finetune: str, args: argparse.Namespace,
            failure: Optional[str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One result row per requested shape from a child's lines (``failure``: how the child ended, if badly)."""
    setup = next((line for line in lines if line["kind"] in ("setup", "setup_error")), {"kind": None})
    done = {line["shape"]: line for line in lines if line["kind"] == "shape"}
    env = next((line["environment"] for line in lines if line["kind"] == "environment"), {})
    info = {k: v for k, v in setup.items() if k not in ("kind", "status", "error")}
    rows = []
    for shape in args.shapes:
        batch, seq = parse_shape(shape)
        row = {"stack": args.stack_label, "row": impl.key, "name": impl.name, "finetune": finetune, "shape": shape,
               "batch": batch, "seq": seq, "layers": args.layers, "steps": args.steps, "warmup": args.warmup, **info}
        if shape in done:
            row.update({k: v for k, v in done[shape].items() if k != "kind"})
        elif setup["kind"] == "setup_error":
            row.update(status=setup["status"], error=f"at setup: {setup['error']}")
        else:
            row.update(status="error", error=f"not run: {failure or 'the child ended before this shape'}")
        rows.append(row)
    return rows, env


def spawn(impl: Implementation, finetune: str, args: argparse.Namespace,
          workdir: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run one child in its own process group, killed whole on timeout (torch.compile's workers too). Not in a new
    session: a parent killed from outside (a time-limited call) takes the child down with its session."""
    result_file = workdir / f"{impl.key}--{finetune}.jsonl"
    print(f"[full_model] child: {impl.name} | {finetune} | shapes {' '.join(args.shapes)}", flush=True)
    proc = subprocess.Popen(child_command(impl.key, finetune, args, result_file), env=child_env(),
                            preexec_fn=os.setpgrp)  # process_group=0 once Python 3.10 is dropped
    try:
        code = proc.wait(timeout=args.timeout)
        failure = None if code == 0 else f"the child exited with code {code}"
    except subprocess.TimeoutExpired:
        failure = f"the child timed out after {args.timeout} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return collect(read_lines(result_file), impl, finetune, args, failure)


def empty_results() -> dict[str, Any]:
    return {"stacks": {}, "results": []}


def stack_entry(layers: int, env: dict[str, str]) -> dict[str, Any]:
    return {"layers": layers, "environment": env, "conflicts": []}


def _order(row: dict[str, Any]) -> tuple[Any, ...]:
    keys = list(BY_KEY)  # rows of earlier versions' implementations (e.g. plugin-default-graphs) go last
    return (row["stack"], keys.index(row["row"]) if row["row"] in keys else len(keys),
            list(FINETUNES).index(row["finetune"]),
            SHAPES.index(row["shape"]))


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: its rows replace those of the same (stack, implementation, fine-tune, shape).

    One stack label holds one depth (a smoke run needs its own label); versions that differ between calls under
    one label are kept as conflicts and shown in the doc.
    """
    stacks = copy.deepcopy(old["stacks"])
    for label, entry in new["stacks"].items():
        if label not in stacks:
            stacks[label] = copy.deepcopy(entry)
            continue
        have = stacks[label]
        if have["layers"] != entry["layers"]:
            raise ValueError(f"stack label {label!r} holds {have['layers']}-layer results, these are "
                             f"{entry['layers']}-layer: use another --stack-label")
        conflicts = have["conflicts"] + entry["conflicts"]
        was, now = have["environment"], entry["environment"]
        if was and now:
            conflicts += [f"{field}: {was.get(field)} ({was.get('date')}) vs {now.get(field)} ({now.get('date')})"
                          for field in STACK_FIELDS if was.get(field) != now.get(field)]
        have["environment"] = was or now
        have["conflicts"] = list(dict.fromkeys(conflicts))
    key = lambda r: (r["stack"], r["row"], r["finetune"], r["shape"])  # noqa: E731
    rows = {key(r): r for r in old["results"]}
    rows.update({key(r): r for r in new["results"]})
    return {"stacks": stacks, "results": sorted(rows.values(), key=_order)}


def annotated(results: dict[str, Any]) -> dict[str, Any]:
    """The results with what follows from them: speed-up over the reference per row, the targets per stack."""
    out = copy.deepcopy(results)
    ref = {(r["stack"], r["finetune"], r["shape"]): r for r in out["results"] if r["row"] == REFERENCE}
    for row in out["results"]:
        row["vs_reference"] = speedup(row, ref.get((row["stack"], row["finetune"], row["shape"])))
    out["targets"] = {label: targets_json(check_targets([r for r in out["results"] if r["stack"] == label]))
                      for label in out["stacks"]}
    return out


def load(path: Path) -> dict[str, Any]:
    """A saved results file, without what :func:`annotated` derives (recomputed after every merge)."""
    data = json.loads(path.read_text())
    return {"stacks": data["stacks"], "results": [{k: v for k, v in r.items() if k != "vs_reference"}
                                                  for r in data["results"]]}


def _row_line(row: dict[str, Any]) -> str:
    """A table line; a failed row keeps its memory after setup (when setup got that far) and dashes elsewhere."""
    setup = f"{row['setup_gib']:.1f} GiB" if "setup_gib" in row else "-"
    if row["status"] != "ok":
        cells = [outcome(row), "-", "-", "-", setup, "-", "-", "-", "-"]
    else:
        loss = f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}" + ("" if row["finite"] else " (not finite)")
        cells = [f"{row['median_ms']:.1f} ms ({row['min_ms']:.1f}-{row['max_ms']:.1f})", f"{row['tokens_per_s']:,.0f}",
                 f"{row['vs_reference']:.2f}x" if row.get("vs_reference") is not None else "-",
                 f"{row['peak_gib']:.1f} GiB", setup, f"{row['gpu_busy']:.0%}" if "gpu_busy" in row else "-",
                 f"{row['host_ms']:.0f} ms", f"{row['launches']:,}" if "launches" in row else "-", loss]
    return "| " + " | ".join([row["name"], shape_label(row["shape"]), *cells]) + " |"


def graphs_text(status: dict[str, Any]) -> str:
    """A graphed row's :func:`~lightning_te_moe.graphs.graph_status` in words."""
    text = f"{status['graphed']} of {status['layers']} decoder layers replayed as CUDA graphs"
    if status["refused"]:
        text += f"; refused: {'; '.join(status['refused'])}"
    if status["eager_calls"]:
        text += "; eager calls: " + ", ".join(f"{n} ({why})" for why, n in status["eager_calls"].items())
    return text


def markers(label: str) -> tuple[str, str]:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-").lower() or "default"
    return f"<!-- full_model[{slug}]:begin -->", f"<!-- full_model[{slug}]:end -->"


def render(results: dict[str, Any], label: str) -> str:
    """One stack's section: environment, a table per fine-tune, the plugin's plans, the targets."""
    data = annotated(results)
    stack = data["stacks"][label]
    rows = [r for r in data["results"] if r["stack"] == label]
    env = stack["environment"]
    runs = sorted({(r["steps"], r["warmup"]) for r in rows})
    counts = ", ".join(f"{s} timed steps after {w} warm-up" for s, w in runs)
    depth = "24 layers" if stack["layers"] == LAYERS else f"{stack['layers']} layers (a cut-down smoke run)"
    begin, end = markers(label)
    lines = [begin, f"## Full GPT-OSS-20B fine-tuning, {label} (`benchmarks/full_model.py`)", "",
             f"{env.get('device', 'GPU not recorded')}, {env.get('date', '?')}; torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda', '?')}), transformers {env.get('transformers', '?')}, "
             f"PEFT {env.get('peft', '?')}, TE {env.get('te', '?')}, cuDNN {env.get('cudnn', '?')}, "
             f"cuBLASLt {env.get('cublaslt', '?')}."
             + (f" GPU memory capped at {env['memory_cap_gib']} GiB a process (torch's"
                " `set_per_process_memory_fraction`): a shape fits only where it would fit in that much memory."
                if env.get("memory_cap_gib") else ""), "",
             f"GPT-OSS-20B architecture, {depth} (hidden 2880, 64 heads, 8 KV heads, 32 experts top-4, vocab 201,088, "
             "window 128 on alternate layers), random init, BF16 weights built on the GPU; transformers' experts "
             "`grouped_mm`; fused AdamW on the trainable parameters (the LoRA adapters, in FP32 in every row: PEFT keeps "
             "them so, the plugin's default `params_dtype`). Every implementation and fine-tune ran in "
             f"its own process; median (min-max) of {counts}. Peak = `max_memory_allocated` over the timed steps; "
             "setup = allocated after building, LoRA, conversion and optimizer creation; GPU busy = union of CUDA "
             f"kernel intervals over {PROFILED_STEPS} profiled steps / the median step; host = the host's time to "
             "issue one step; kernels = launches per step. vs reference = transformers grouped_mm + flex attention, "
             "same fine-tune and shape.", ""]
    if stack["conflicts"]:
        lines += [f"**Warning:** calls under this label ran on differing stacks: {'; '.join(stack['conflicts'])}.", ""]
    for finetune in dict.fromkeys(r["finetune"] for r in rows):
        lines += [f"### {FINETUNES.get(finetune, finetune)} (`{finetune}`)", "",
                  "| implementation | batch x seq | step | tokens/s | vs reference | peak | after setup | GPU busy | "
                  "host | kernels | loss (first -> last step) |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  *(_row_line(r) for r in rows if r["finetune"] == finetune), ""]
    plans = {(r["name"], r["finetune"]): r["plan"] for r in rows if r.get("plan")}
    lines += [f"- {name}, `{finetune}`: plan `{plan}`" for (name, finetune), plan in plans.items()]
    lines += [f"- {r['name']}, `{r['finetune']}`, {shape_label(r['shape'])}: {graphs_text(r['graphs'])}"
              for r in rows if r.get("graphs") and r["graphs"]["layers"] and r["status"] == "ok"]
    lines += [f"- {r['name']}, `{r['finetune']}`, {shape_label(r['shape'])}: out of GPU memory; "
              f"the plugin's memory fallback took {', '.join(r['memory'])} and the step ran again (timed after)"
              for r in rows if r.get("memory")]
    targets = check_targets(rows)
    lines += ["", "**Targets** (issue 12), checked on this stack's rows (`benchmarks/full_model_targets.py`):", "",
              *targets_markdown(targets), end]
    return "\n".join(lines)


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_model.json").write_text(json.dumps(annotated(results), indent=2))
    (out / "full_model.md").write_text("\n\n".join(render(results, label) for label in results["stacks"]) + "\n")


def write_docs(results: dict[str, Any], doc: Path = DOC) -> None:
    """Each stack's section between its own markers, so the sections of two CUDA stacks sit side by side."""
    for label in results["stacks"]:
        write_section(render(results, label), *markers(label), doc)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="folder for full_model.json / .md")
    p.add_argument("--rows", nargs="+", choices=list(BY_KEY), default=list(BY_KEY), help="implementations")
    p.add_argument("--finetunes", nargs="+", choices=list(FINETUNES), default=list(FINETUNES))
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES), help="batch x seq")
    p.add_argument("--steps", type=int, default=5, help="timed steps per shape")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (compilation, allocator, optimizer; a CUDA graph captures at the third)")
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (24 = GPT-OSS-20B; 2 for a smoke run)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per child before it is killed")
    p.add_argument("--memory-cap-gib", type=float,
                   help="cap each child's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. an 80 GB H100's"
                        " on a larger GPU: a shape then fits only where it would fit there")
    p.add_argument("--memory-history", action="store_true",
                   help="record where each live block was allocated (torch's memory history): a shape out of memory"
                        " then lists the allocations that keep free memory reserved (pinned_after_failure)")
    p.add_argument("--stack-label", default="default", help="names the CUDA stack: one doc section per label")
    p.add_argument("--append", type=Path, help="merge into this existing results JSON (earlier calls)")
    p.add_argument("--render", type=Path, nargs="+", help="only merge these results files and write the docs")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "FINETUNE"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "layers", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.memory_cap_gib is not None and args.memory_cap_gib <= 0:
        p.error(f"--memory-cap-gib must be more than 0 (GiB of GPU memory a process), got {args.memory_cap_gib:g}")
    graphed = [key for key in args.rows if BY_KEY[key].graphed]
    if graphed and args.warmup < GRAPH_WARMUP:
        p.error(f"--warmup {args.warmup}: rows {', '.join(graphed)} capture their CUDA graphs at step {GRAPH_WARMUP}, "
                f"so they need --warmup {GRAPH_WARMUP} or more (or leave those rows out)")
    if args.append is not None and not args.append.is_file():
        p.error(f"--append {args.append}: no such results file (leave --append out for a first call)")
    if args.render:
        results = empty_results()
        for path in args.render:
            results = merge(results, load(path))
        save(results, args.out)
        write_docs(results)
        print((args.out / "full_model.md").read_text())
        return
    if not torch.cuda.is_available():
        p.error("a CUDA GPU is needed to run the benchmark (torch.cuda.is_available() is False); "
                "--render FILE works without one")
    from lightning_te_moe.experts.gemm import te_available

    runs = [args.child[0]] if args.child else args.rows  # a child runs its one row (spawned without --rows)
    plugin_rows = [key for key in runs if BY_KEY[key].recipe is not None]
    if plugin_rows and not te_available():
        p.error(f"rows {', '.join(plugin_rows)} run the plugin, and Transformer Engine does not import here: they"
                " would measure the torch-only path (rule no-te) under the TE plans' names. Make TE importable, or"
                " leave those rows out")
    if args.child:
        impl, finetune = args.child
        run_child(BY_KEY[impl], finetune, args.shapes, args.steps, args.warmup, args.layers, args.result_file,
                  args.memory_cap_gib, args.memory_history)
        return
    results = load(args.append) if args.append else empty_results()
    try:
        results = merge(results, {"stacks": {args.stack_label: stack_entry(args.layers, {})}, "results": []})
    except ValueError as err:
        p.error(str(err))
    with tempfile.TemporaryDirectory() as tmp:
        for impl in (BY_KEY[key] for key in args.rows):
            for finetune in args.finetunes:
                rows, env = spawn(impl, finetune, args, Path(tmp))
                results = merge(results, {"stacks": {args.stack_label: stack_entry(args.layers, env)},
                                          "results": rows})
                save(results, args.out)
    write_docs(results)
    print((args.out / "full_model.md").read_text())


if __name__ == "__main__":
    main()
