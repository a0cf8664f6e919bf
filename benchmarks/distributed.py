"""Issue 16's distributed run: the full GPT-OSS-20B architecture under Lightning's ModelParallelStrategy (FSDP2) with
the plugin, and DDP on 2 GPUs against 1 GPU. Writes JSON; never invents a number (a run that did not happen is absent).

Each configuration is one Lightning run in its own process group (``run``); ``all`` runs the issue's list of them one
after another and merges their results into ``OUT/distributed.json``:

    NCCL_NVLS_ENABLE=0 python benchmarks/distributed.py all --out /tmp/dist            # 4 GPUs: FSDP2 + DDP
    NCCL_NVLS_ENABLE=0 python benchmarks/distributed.py all --out /tmp/dist --skip-export
    python benchmarks/distributed.py all --tiny --out /tmp/dist-tiny                   # CPU, gloo, seconds

FSDP2 runs (``--strategy fsdp2``): the model is built on the meta device in ``configure_model``, swapped and sharded
by :func:`lightning_te_moe.distributed.shard_model`, then materialized shard by shard on the GPU (random init: norms
1, biases 0, other weights N(0, 0.02)); all parameters train (AdamW, FP32 master weights), batch 1 x ``--seq`` per
GPU. Per run: tokens/s and model TFLOP/s per GPU over the timed steps (after ``--warmup``), peak memory per GPU, the
seconds of its phases (setup up to the first step, the whole fit, the checkpoint's save, the resume), the plan, and
each rank's decisions. The default-plan run also provokes a NaN loss on the last rank at the steps ``--nan-at`` (on a
GPU 12 and 13: a repeat within the guard's window, a step-down where the plan has a lower rung; the default plan
under FSDP2 on Hopper is BF16, whose ladder has none, so ``fsdp2-fp8`` repeats the NaN on FP8 current, a step-down
from FP8; on the CPU one skipped batch), and every rank must record the same decisions at the same step; it saves
a sharded checkpoint and resumes it in a fresh process (as a restarted job does) for 2 more steps (plan, rung, guard
state and decision history must come back), and exports to the HF layout and loads it back (unless
``--skip-export``). ``--profile N`` profiles N more steps after the timed ones: GPU kernel time per step (the union
over streams), NCCL's share of it, the launches and the longest-running kernels, so a slow step says whether it
waits on the host, on the collectives or on compute, and which compute. DDP runs (``--strategy ddp``) train a 2-layer
model of the same widths on 1 and on 2 GPUs.

Model FLOPs per token: 6 x the parameters a token passes through (embeddings excluded; experts counted at top-k of
their number; the output head included) + attention 12 x heads x head dim x context per layer (context: the sequence
on full-attention layers, the window on sliding ones; no causal halving). NeMo's reported 279 TFLOP/s at 13,058
tokens/s is 21.4 GFLOP a token, close to 6 x the active parameters alone (21.7 GFLOP); this count adds 2.5 GFLOP of
attention at 4,096 tokens, so compare tokens/s first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_te_moe.distributed.export import export_hf  # noqa: E402
from lightning_te_moe.distributed.sharding import REDUCE_DTYPES  # noqa: E402
from lightning_te_moe.guard.host_budget import read_meminfo  # noqa: E402

#: Issue 16's reference: NeMo AutoModel, GPT-OSS-20B, 8 H100s, BF16, sequence 4,096 (its performance summary).
REFERENCE = {"tokens_per_s_per_gpu": 13058, "tflops_per_gpu": 279, "source": "NeMo AutoModel performance summary"}


def gpt_oss_config(tiny: bool, layers: Optional[int] = None) -> Any:
    """GPT-OSS-20B's architecture (``layers`` to cut it), or a tiny one of the same kind for CPU."""
    from transformers import GptOssConfig

    if tiny:
        config = GptOssConfig(num_hidden_layers=layers or 2, num_local_experts=8, num_experts_per_tok=2, vocab_size=64,
                              hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, sliding_window=8, max_position_embeddings=64, router_aux_loss_coef=0.0,
                              tie_word_embeddings=False, use_cache=False,
                              layer_types=["sliding_attention", "full_attention"] * ((layers or 2) // 2))
        config._attn_implementation = "eager"
        return config
    return GptOssConfig(num_hidden_layers=layers or 24, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
                        hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, sliding_window=128, router_aux_loss_coef=0.0, tie_word_embeddings=False,
                        use_cache=False)


def flops_per_token(config: Any, seq: int) -> float:
    """Model FLOPs of one trained token (forward + backward), as the module docstring defines them."""
    h, i, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention_params = h * q + 2 * h * kv + q * h
    expert_params = k * (h * 2 * i + i * h)
    per_layer = attention_params + h * e + expert_params
    params = config.num_hidden_layers * per_layer + h * config.vocab_size
    contexts = [seq if t == "full_attention" else min(seq, config.sliding_window) for t in config.layer_types]
    attention = sum(12 * q * c for c in contexts)
    return 6.0 * params + attention


@torch.no_grad()
def fill_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random init of each rank's own shards: norms 1, biases 0, other weights N(0, std), seeded per rank."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    generator: Optional[torch.Generator] = None
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if name.endswith("bias") or "bias" in name.rsplit(".", 1)[-1]:
            local.zero_()
        elif "norm" in name:
            local.fill_(1.0)
        else:
            generator = generator or torch.Generator(local.device).manual_seed(seed + rank)
            local.normal_(0.0, std, generator=generator)


def restore_buffers(hf: Any, device: torch.device) -> None:
    """The rotary embedding's buffers, recomputed after ``to_empty`` (it leaves them uninitialised)."""
    rotary = hf.model.rotary_emb
    fresh = type(rotary)(config=hf.config).to(device)  # transformers 5.24 takes no device argument here
    for name, buffer in fresh.named_buffers():
        getattr(rotary, name).copy_(buffer)


def lightning_module(args: argparse.Namespace) -> Any:
    import lightning as L

    from lightning_te_moe.distributed import shard_model

    class GptOss(L.LightningModule):
        """The causal LM loss on random tokens; a NaN loss on one rank at ``nan_at``."""

        def __init__(self) -> None:
            super().__init__()
            self.config = gpt_oss_config(args.tiny, args.layers)
            self.model: Any = None

        def configure_model(self) -> None:
            from transformers import AutoModelForCausalLM

            if self.model is not None:
                return
            device = self.trainer.strategy.root_device
            meta = args.strategy == "fsdp2"
            with torch.device("meta" if meta else device):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            self.model.train()
            if args.checkpointing:  # non-reentrant: recomputes under the plan's recipe (lightning_te_moe.recompute)
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if meta:
                shard_model(self, reduce_dtype=getattr(torch, args.reduce_dtype))
                self.model.to_empty(device=device)
                restore_buffers(self.model, device)
            fill_weights(self.model)

        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            loss = self.model(input_ids=batch, labels=batch).loss
            last_rank = self.global_rank == self.trainer.world_size - 1
            if args.nan_at and self.global_step in args.nan_at and last_rank:
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            fused = {"fused": True} if self.trainer.strategy.root_device.type == "cuda" else {}
            return torch.optim.AdamW(self.parameters(), lr=1e-5, **fused)

    return GptOss()


def loader(args: argparse.Namespace, steps: int) -> torch.utils.data.DataLoader:
    vocab = gpt_oss_config(args.tiny).vocab_size
    data = torch.randint(0, vocab, (steps * args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(data, batch_size=args.batch)


def timer_callback(warmup: int, last: int) -> Any:
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """Wall time of each optimizer step after ``warmup`` up to step ``last`` (device synchronised)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0
            self.first_step_at: Optional[float] = None  # perf_counter at the first step: setup's end

        def _sync(self, trainer: Any) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            self._sync(trainer)
            if trainer.global_step == warmup and trainer.strategy.root_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self._start = time.perf_counter()
            if self.first_step_at is None:
                self.first_step_at = self._start

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            self._sync(trainer)
            if warmup < trainer.global_step <= last:
                self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def profile_callback(start: int, steps: int) -> Any:
    """Profiles ``steps`` optimizer steps after step ``start`` on a GPU (after the timed ones: the profiler slows the
    host): GPU kernel time (union over streams), NCCL's share of it, and launches, per step."""
    from lightning.pytorch import Callback

    class StepProfile(Callback):
        def __init__(self) -> None:
            self.result: dict[str, Any] = {"skipped": "not on a GPU"}
            self._profiler: Any = None
            self._begin: Any = None

        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step != start or trainer.strategy.root_device.type != "cuda" or self._profiler:
                return
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.__enter__()
            self._begin = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if self._profiler is None or trainer.global_step != start + steps:
                return
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self._begin) * 1e3 / steps
            self._profiler.__exit__(None, None, None)
            self.result = kernel_summary(self._profiler, steps, wall_ms)

    return StepProfile()


def kernel_summary(profiler: Any, steps: int, wall_ms: float) -> dict[str, Any]:
    """Per step: kernel time (union over streams), NCCL kernel time, the rest, launches, the profiled wall time and
    GPU busy (kernel time over that wall time: the same steps; the timed steps' median can differ from profiled ones
    by -19% to +44% at full size, 2026-11-28); an error instead where the profile holds no kernel (CUPTI missing
    or refused), which must not read as an idle GPU. An NCCL kernel runs from its launch until its peers join, so
    NCCL time includes waiting for the slowest rank."""
    from full_model import kernel_time, trace_events

    events = trace_events(profiler)
    busy_us, launches = kernel_time(events)
    if not launches:
        return {"steps": steps, "profiled_step_ms": wall_ms,
                "error": "the profile recorded no CUDA kernel (CUPTI missing or refused): no kernel figures"}
    nccl_us, nccl_launches = kernel_time(events, only=lambda name: "nccl" in name.lower())
    compute_us, _ = kernel_time(events, only=lambda name: "nccl" not in name.lower())
    kernel_ms = busy_us / 1e3 / steps
    return {"steps": steps, "kernel_ms": kernel_ms, "nccl_ms": nccl_us / 1e3 / steps,
            "compute_ms": compute_us / 1e3 / steps, "launches": launches // steps,
            "nccl_launches": nccl_launches // steps, "profiled_step_ms": wall_ms, "gpu_busy": kernel_ms / wall_ms,
            "top_kernels": top_kernels(events, steps)}


def top_kernels(events: list[dict[str, Any]], steps: int, count: int = 15) -> list[list[Any]]:
    """The ``count`` kernels that ran longest, per step: ``[name (its first 100 characters), ms, launches]``,
    summed over their launches (overlapping streams count twice here): where the compute time goes."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            total = totals.setdefault(e.get("name", "")[:100], [0.0, 0])
            total[0] += e["dur"]
            total[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [[name, us / 1e3 / steps, launches / steps] for name, (us, launches) in ranked]


def trainer_for(args: argparse.Namespace, plugin: Any, steps: int, callbacks: list) -> Any:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    strategy: Any = (ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
                     if args.strategy == "fsdp2" else DDPStrategy() if args.devices > 1 else "auto")
    return L.Trainer(accelerator="cpu" if args.tiny else "cuda", devices=args.devices, strategy=strategy,
                     plugins=[plugin], max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=args.out / args.name, num_sanity_val_steps=0)


def decisions(plugin: Any) -> list[list[Any]]:
    return [[d.kind, d.step, d.from_, d.to] for d in plugin.decisions.decisions if d.kind not in ("swap", "snapshot")]


def precision(args: argparse.Namespace) -> Any:
    """The plugin: the guard snapshots every step on the tiny model (so a rollback has a recent copy); on GPUs its
    own cadence decides (a host copy of a 20B model's shards and AdamW state is 84 GB every time)."""
    from lightning_te_moe import GuardConfig, TEMoEPrecision
    from lightning_te_moe.cli import CUDA_GRAPHS_ARG

    guard = GuardConfig(snapshot_every=1) if args.tiny else GuardConfig()
    return TEMoEPrecision(args.recipe, print_plan=False, guard_config=guard, params_dtype=args.params_dtype,
                          cuda_graphs=CUDA_GRAPHS_ARG[args.cuda_graphs])


def run(args: argparse.Namespace) -> None:
    """One configuration; every rank writes ``OUT/NAME.rank<N>.json``."""
    plugin = precision(args)
    timer = timer_callback(args.warmup, args.steps)
    profiler = profile_callback(args.steps, args.profile)
    total = args.steps + args.profile
    trainer = trainer_for(args, plugin, total, [timer, profiler] if args.profile else [timer])
    module = lightning_module(args)
    begin = time.perf_counter()
    trainer.fit(module, loader(args, total))
    seconds = {"setup": (timer.first_step_at or begin) - begin, "fit": time.perf_counter() - begin}
    cuda = trainer.strategy.root_device.type == "cuda"
    tokens = args.batch * args.seq
    step_s = sorted(timer.times)[len(timer.times) // 2] if timer.times else None
    result: dict[str, Any] = {
        "name": args.name, "strategy": args.strategy, "devices": args.devices, "recipe": args.recipe,
        "params_dtype": args.params_dtype, "reduce_dtype": args.reduce_dtype, "checkpointing": args.checkpointing,
        "plan": plugin.state.plan.summary(), "rung": plugin.state.index, "global_step": trainer.global_step,
        "seq": args.seq, "batch_per_gpu": args.batch, "timed_steps": len(timer.times), "median_step_s": step_s,
        "min_step_s": min(timer.times, default=None), "max_step_s": max(timer.times, default=None),
        "tokens_per_s_per_gpu": tokens / step_s if step_s else None,
        "tflops_per_gpu": tokens * flops_per_token(module.config, args.seq) / step_s / 1e12 if step_s else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "decisions": decisions(plugin), "seconds": seconds, "plan_dict": plugin.state.plan.to_dict(),
    }
    if args.profile:
        result["profile"] = profiler.result
    if plugin.guard is not None:
        result["guard_host_copies_gib"] = plugin.guard.snapshots.nbytes / 2**30
    result["host_memory_gib"] = {"after_fit": host_memory()}
    rank = trainer.global_rank
    path = args.out / f"{args.name}.rank{rank}.json"
    path.write_text(json.dumps(result, indent=1))  # the training numbers survive a failure in what follows
    if args.checkpoint:
        begin = time.perf_counter()
        trainer.save_checkpoint(checkpoint_dir(args))
        seconds["save"] = time.perf_counter() - begin
        result["host_memory_gib"]["after_save"] = host_memory()
        # The guard's pinned host snapshots (two copies of each rank's shards and AdamW state: 2 x 32 GB a rank at
        # full size, 256 GB of a 4 x H100 host's 503) go back to the OS before the export gathers the whole model on
        # rank 0's host.
        plugin.guard.snapshots.release()
        if args.export:
            result["export"] = export_check(module, args.out / args.name / "hf", rank, args)
        path.write_text(json.dumps(result, indent=1))


def host_memory() -> dict[str, float]:
    """The host's available and shared memory (GiB, /proc/meminfo; empty elsewhere): the guard's pinned copies count as
    shared, and a save copies every rank's shards to the host once more."""
    counters = read_meminfo()
    fields = {"MemAvailable": "available", "Shmem": "shared", "MemTotal": "total"}
    return {name: round(counters[key] / 2**30, 1) for key, name in fields.items() if key in counters}


def checkpoint_dir(args: argparse.Namespace) -> Path:
    return args.out / args.name / "ckpt"


def resume(args: argparse.Namespace) -> None:
    """The configuration's sharded checkpoint resumed in a fresh process, as a restarted job resumes, for 2 more
    steps; every rank writes ``OUT/NAME.resume.rank<N>.json`` (its plan, rung and decisions after the resume).

    A fresh process: the first run's state (GPU memory, the guard's pinned host snapshots, torch's pinned-memory
    cache) is gone, as on a restarted job; resumed in the same process on 4 x H100 (503 GB of host memory) the run
    was killed by the host's OOM killer three times (2026-11-27 and -28)."""
    plugin = precision(args)
    total = args.steps + args.profile + 2
    trainer = trainer_for(args, plugin, total, [])
    begin = time.perf_counter()
    trainer.fit(lightning_module(args), loader(args, total), ckpt_path=checkpoint_dir(args))
    result = {"global_step": trainer.global_step, "rung": plugin.state.index, "plan": plugin.state.plan.to_dict(),
              "decisions": decisions(plugin), "seconds": time.perf_counter() - begin}
    (args.out / f"{args.name}.resume.rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


def export_check(module: Any, out: Path, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """Export to the HF layout (every rank), then rank 0 loads it with ``from_pretrained`` on the CPU."""
    start = time.perf_counter()
    export_hf(module, out)
    seconds = time.perf_counter() - start
    if rank != 0:
        return {"export_s": seconds}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    shapes = {k: list(v.shape) for k, v in loaded.state_dict().items()}
    expected = gpt_oss_config(args.tiny, args.layers)
    return {"export_s": seconds, "loaded": True, "tensors": len(shapes),
            "experts_shape": shapes.get("model.layers.0.mlp.experts.gate_up_proj"),
            "expected_experts_shape": [expected.num_local_experts, expected.hidden_size,
                                       2 * expected.intermediate_size]}


#: The names of :func:`configurations`, in its order.
CONFIGURATIONS = ("fsdp2-bf16", "fsdp2-default", "fsdp2-fp8", "ddp-1", "ddp-2")


def configurations(args: argparse.Namespace) -> list[list[str]]:
    """Issue 16's runs: FSDP2 on every GPU in BF16 and with the default plan (NaN, checkpoint, export), FP8 current
    named (a NaN repeat: the step-down from FP8, which the default plan does not start on under FSDP2 on Hopper, rule
    ``hopper-sharded-bf16``; GPU only), DDP 1 vs 2."""
    common = ["--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--params-dtype", args.params_dtype, "--reduce-dtype", args.reduce_dtype]
    common += ["--checkpointing"] if args.checkpointing else []
    common += ["--profile", str(args.profile)] if args.profile else []
    common += ["--tiny"] if args.tiny else []
    common += ["--allow-no-te"] if args.allow_no_te else []
    export = [] if args.skip_export else ["--export"]
    ddp_layers = ["--layers", "2"]
    return [
        ["--name", "fsdp2-bf16", "--strategy", "fsdp2", "--devices", str(args.devices), "--recipe", "bf16", *common],
        ["--name", "fsdp2-default", "--strategy", "fsdp2", "--devices", str(args.devices), "--recipe", "auto",
         "--nan-at", *map(str, args.nan_at or ([3] if args.tiny else [12, 13])), "--checkpoint", *export,
         *common],
        *([] if args.tiny else [  # the CPU runs no FP8
            ["--name", "fsdp2-fp8", "--strategy", "fsdp2", "--devices", str(args.devices), "--recipe", "fp8_current",
             "--nan-at", *map(str, args.nan_at or [12, 13]), *common]]),
        # one process runs CUDA graphs by default, two do not: ddp-1 turns them off so the scaling compares one step
        ["--name", "ddp-1", "--strategy", "ddp", "--devices", "1", "--recipe", "auto", "--cuda-graphs", "off",
         *ddp_layers, *common],
        ["--name", "ddp-2", "--strategy", "ddp", "--devices", "2", "--recipe", "auto", *ddp_layers, *common],
    ]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": dt.date.today().isoformat(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    try:
        import transformer_engine

        info["te"] = transformer_engine.__version__
    except ImportError:
        info["te"] = None
    return info


def summarize(name: str, ranks: list[dict[str, Any]], resumed: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One configuration's result: rank 0's, with the per-rank peaks, whether every rank decided alike, and the
    resume (``resumed``: each rank's :func:`resume` result) against the saved run."""
    merged = dict(ranks[0])
    merged["ranks_reported"] = len(ranks)
    merged["peak_memory_gib_per_rank"] = [r["peak_memory_gib"] for r in ranks]
    merged["same_decisions_on_every_rank"] = all(r["decisions"] == ranks[0]["decisions"] for r in ranks)
    if resumed:
        first = resumed[0]
        merged["resume"] = {"global_step": first["global_step"], "rung": first["rung"],
                            "plan_equal": first["plan"] == merged["plan_dict"],
                            "history_kept": first["decisions"][:len(merged["decisions"])] == merged["decisions"],
                            "decisions": first["decisions"], "ranks_reported": len(resumed)}
        merged["seconds"] = {**merged["seconds"], "resume": first["seconds"]}
        keys = ("global_step", "rung", "plan", "decisions")
        merged["same_resume_on_every_rank"] = all([r[k] for k in keys] == [first[k] for k in keys] for r in resumed)
    return merged


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    merged = args.out / "distributed.json"
    results: dict[str, Any] = {"environment": environment(), "reference": REFERENCE, "runs": {}, "failed": {}}
    if args.only and merged.exists():  # a later call adds its configurations to the earlier ones' results
        earlier = json.loads(merged.read_text())
        results["runs"], results["failed"] = earlier.get("runs", {}), earlier.get("failed", {})
    for config in configurations(args):
        name = config[1]
        if args.only and name not in args.only:
            continue
        results["failed"].pop(name, None)
        results["runs"].pop(name, None)
        for stale in [*args.out.glob(f"{name}.rank*.json"), *args.out.glob(f"{name}.resume.rank*.json")]:
            stale.unlink()
        failure = launch(config, args)
        if failure is None and "--checkpoint" in config:
            failure = launch([*config, "--resume-from-checkpoint"], args)
            failure = f"resume: {failure}" if failure is not None else None
        ranks = sorted(args.out.glob(f"{name}.rank*.json"))
        if failure is not None or not ranks:
            results["failed"][name] = failure or "no rank wrote its results"
        if ranks:  # what the ranks wrote before a failure (training numbers) is kept beside the failure
            resumed = [json.loads(p.read_text()) for p in sorted(args.out.glob(f"{name}.resume.rank*.json"))]
            results["runs"][name] = summarize(name, [json.loads(p.read_text()) for p in ranks], resumed)
        merged.write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    if "ddp-1" in runs and "ddp-2" in runs and runs["ddp-1"]["tokens_per_s_per_gpu"]:
        results["ddp_scaling"] = 2 * runs["ddp-2"]["tokens_per_s_per_gpu"] / runs["ddp-1"]["tokens_per_s_per_gpu"]
    merged.write_text(json.dumps(results, indent=1))
    return results


def launch(config: list[str], args: argparse.Namespace) -> Optional[str]:
    """One ``run`` of ``config`` in its own process (and process group); its failure's text, or None."""
    command = [sys.executable, str(Path(__file__).resolve()), "run", "--out", str(args.out), *config]
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "NCCL_NVLS_ENABLE": "0"}, capture_output=True,
                              text=True, timeout=args.timeout, check=False)
        return done.stderr[-4000:] if done.returncode != 0 else None
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        return f"timed out after {args.timeout} s\n" + (stderr or "")[-4000:]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("all", "run"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny GPT-OSS on CPU (gloo): checks the script in seconds")
    p.add_argument("--devices", type=int, default=None, help="GPUs for FSDP2 (default: all; --tiny: 2 processes)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4,096; --tiny 16)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 24; --tiny 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 4; --tiny 1)")
    p.add_argument("--nan-at", type=int, nargs="+", default=None,
                   help="steps of the NaN loss on the last rank (all: in fsdp2-default, default 12 13, --tiny 3;"
                        " run: none unless given)")
    p.add_argument("--skip-export", action="store_true", help="all: no HF export (it gathers 84 GB on rank 0)")
    p.add_argument("--allow-no-te", action="store_true",
                   help="measure on a GPU without Transformer Engine (the torch-only path); refused otherwise")
    p.add_argument("--timeout", type=int, default=3600, help="all: seconds per configuration")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many steps after the timed ones (GPU kernel time, NCCL's share; 0: none)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing (transformers' gradient_checkpointing_enable, non-reentrant)")
    p.add_argument("--only", nargs="+", choices=CONFIGURATIONS, default=None,
                   help="all: just these configurations, merged into OUT/distributed.json's earlier results")
    p.add_argument("--reduce-dtype", choices=[str(d).removeprefix("torch.") for d in REDUCE_DTYPES],
                   default="float32",
                   help="the dtype FSDP2 reduces gradients in (float32: torchtitan's default; bfloat16: half the"
                        " bytes)")
    p.add_argument("--params-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="master weights (and so AdamW state): float32 needs 16 bytes a parameter, 84 GB per GPU for"
                        " GPT-OSS-20B on 4 GPUs before activations (H200s, or 8 GPUs); bfloat16 needs 8")
    # run's own
    p.add_argument("--name", default="run")
    p.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2")
    p.add_argument("--recipe", default="auto")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",  # lightning_te_moe.cli's choices
                   help="the plugin's cuda_graphs: auto (None: on for one process with TE), on, off")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--resume-from-checkpoint", action="store_true",
                   help="run: resume this configuration's checkpoint (OUT/NAME/ckpt) for 2 more steps instead")
    p.add_argument("--export", action="store_true")
    return p


def check_te(args: argparse.Namespace) -> None:
    """On a GPU, refuse to measure without TE unless asked: every plan would be the torch-only path (rule
    ``no-te``) and its figures would read as the TE plans' (2026-11-28: a ``PYTHONPATH`` that dropped TE's path gave
    such a run)."""
    from lightning_te_moe.experts.gemm import te_available

    if not args.tiny and not args.allow_no_te and torch.cuda.is_available() and not te_available():
        raise SystemExit("distributed.py: Transformer Engine does not import on this GPU machine, so every plan would"
                         " be the torch-only path, not the TE plans. Make TE importable (its setup, PYTHONPATH), or"
                         " pass --allow-no-te to measure the torch-only path on purpose.")


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    check_te(args)
    gpus = torch.cuda.device_count()
    args.devices = args.devices or (2 if args.tiny else gpus)
    args.seq = args.seq or (16 if args.tiny else 4096)
    args.steps = args.steps or (6 if args.tiny else 24)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 4)
    if args.command == "all" and not args.tiny and gpus < 2:
        raise SystemExit(f"distributed.py all: needs 2 or more GPUs (found {gpus}); --tiny runs on the CPU")
    if args.command == "run" and args.resume_from_checkpoint:
        resume(args)
    elif args.command == "run":
        run(args)
    else:
        print(json.dumps(run_all(args), indent=1))


if __name__ == "__main__":
    main()
