"""Measure the divergence guard at full size: GPT-OSS-20B fine-tunes on one GPU, ``Trainer.fit`` with the plugin,
with and without the guard.

The model is ``full_model.py``'s GPT-OSS-20B (24 layers, vocab 201,088, 32 experts) at random init in BF16, with
``params_dtype="bfloat16"`` as ``docs/fine-tuning.md`` recommends, fused AdamW, batch 1 x --seq random tokens.
Fine-tunes (``--finetunes``): ``lora``, PEFT LoRA r=16 on attention q/k/v/o with the experts frozen (the full-size
issue's fine-tune (a)); ``attention``, attention + embeddings + head trainable (1.8B parameters, issue 12's). The
model is built once per fine-tune and trained by one ``Trainer.fit`` per run of a mode:

* ``off``: the plugin with ``guard=False``;
* ``guard``: the plugin with its default guard (it chooses the snapshot interval for a 2% budget);
* ``every``: the guard with ``snapshot_every=1``, as often as it snapshots (every other step on CUDA, where a copy
  is verified by the values read a step later): the worst case.

``--cuda-graphs`` runs every mode with the plugin's CUDA graphs: the step is then GPU-bound, so the guard's own
per-step hooks show against it rather than drowning in a host-bound step's variation.

``off`` and ``guard`` alternate (--repeats times each; the first fits of a model run slower), then ``every`` runs
once. Per mode: the step time (CUDA events at every batch start, so everything between two steps counts, the
guard's hooks and snapshots included), median / min / max over the --steps steps after --warmup of each of its
runs together, and each run's median. For the guard modes (their last run): a snapshot's bytes, its cost as the
guard measures it (host time issuing it + the side-stream copy's device time), the interval and its share of step
time, the pinned host memory and the time spent allocating it (once per run), the snapshot decisions; for
``every`` also the time of one restore. Writes guard_snapshot.json to --out and prints the table for
docs/divergence-guard.md. Both fine-tunes with --cuda-graphs --warmup 4 took 8.3 minutes on one H100 (2026-11-27).

    python3 benchmarks/guard_snapshot.py --out /tmp/bench [--finetunes lora attention] [--seq 1024] [--steps 20]
    python3 benchmarks/guard_snapshot.py --tiny --out /tmp/bench     # a 2-layer small model: checks the script on a CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from full_model import apply_finetune, fill_weights, gpt_oss_20b_config

from lightning_te_moe.graphs import WARMUP_CALLS, drop_graphs, graph_status, remove_cuda_graphs

#: The modes: (name, the plugin's guard arguments).
MODES = {"off": {"guard": False}, "guard": {}, "every": {"snapshot_every": 1}}


def build(tiny: bool, device: torch.device) -> torch.nn.Module:
    """GPT-OSS-20B's architecture (or a 2-layer small one), random weights, built on the device in BF16."""
    from transformers import AutoModelForCausalLM, GptOssConfig
    from transformers.initialization import no_init_weights

    config = gpt_oss_20b_config(24) if not tiny else GptOssConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
        router_aux_loss_coef=0.0, tie_word_embeddings=False, use_cache=False)
    with device, no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager",
                                                 experts_implementation="grouped_mm")
    fill_weights(model)
    return model.train()


def prepare(finetune: str, tiny: bool, device: torch.device) -> torch.nn.Module:
    """The model with only the fine-tune's parameters trainable."""
    model = build(tiny, device)
    if finetune == "lora":
        return apply_finetune(model, "frozen-experts-lora-attn")
    for name, param in model.named_parameters():
        param.requires_grad_(any(k in name for k in ("self_attn", "embed_tokens", "lm_head")))
    return model


class FineTune(L.LightningModule):
    """Next-token loss of the wrapped causal LM; fused AdamW (on CUDA) on what trains."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=1e-5, fused=self.device.type == "cuda")


class StepTimes(L.Callback):
    """A mark at every batch start and at the end of training (a CUDA event on the training stream, else the wall
    clock): a step is from its batch start to the next, everything the Trainer and its callbacks do included."""

    def __init__(self) -> None:
        self.marks: list[Any] = []

    def _mark(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cuda":
            self.marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append(event)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._mark(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark(pl_module)

    def milliseconds(self) -> list[float]:
        if self.marks and isinstance(self.marks[0], float):
            return [(b - a) * 1e3 for a, b in itertools.pairwise(self.marks)]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in itertools.pairwise(self.marks)]


def spread(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def fit(module: FineTune, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One Trainer.fit of ``module`` in ``mode``; what it measured. Frees the optimizer state and gradients after."""
    from lightning_te_moe import GuardConfig, TEMoEPrecision

    settings = MODES[mode]
    plugin = TEMoEPrecision(args.recipe, params_dtype="bfloat16", print_plan=False,
                            guard=settings.get("guard", True), cuda_graphs=args.cuda_graphs,
                            guard_config=GuardConfig(snapshot_every=settings.get("snapshot_every")))
    timer = StepTimes()
    trainer = L.Trainer(accelerator="auto", devices=1, plugins=[plugin], max_steps=args.warmup + args.steps,
                        callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=args.out)
    vocab = module.model.config.vocab_size
    ids = torch.randint(0, vocab, (args.warmup + args.steps, args.seq), generator=torch.Generator().manual_seed(0))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=1))
    out: dict[str, Any] = {"mode": mode, "plan": plugin.plan.summary(), "times": timer.milliseconds()[args.warmup:]}
    if plugin.guard is not None:
        guard = plugin.guard
        out.update(guard=guard.cadence.stats(), pinned_host_bytes=guard.snapshots.nbytes,
                   host_alloc_ms=guard.snapshots.alloc_ms,
                   decisions=[d.line() for d in plugin.decisions.decisions if d.kind != "swap"])
        if mode == "every":
            synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            synchronize()
            begin = time.perf_counter()
            guard.snapshots.restore(module, trainer.optimizers, [], None)
            synchronize()
            out["restore_ms"] = (time.perf_counter() - begin) * 1e3
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if args.cuda_graphs:  # whether the steps replayed graphs; each fit captures its own (as a user's run does)
        out["graphs"] = graph_status(module.model)
        drop_graphs(module.model)
        remove_cuda_graphs(module.model)
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
    for param in module.parameters():
        param.grad = None
    module.trainer = None  # the trainer holds the plugin, the guard and its pinned copies
    return out


def run(finetune: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    module = FineTune(prepare(finetune, args.tiny, device))
    row: dict[str, Any] = {"finetune": finetune, "seq": args.seq,
                           "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
                           "total_params": sum(p.numel() for p in module.parameters()), "modes": {}}
    runs = []
    for mode in ["off", "guard"] * args.repeats + ["every"]:
        runs.append(fit(module, mode, args))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"finetune": finetune, **runs[-1]}, default=str), flush=True)
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        row["modes"][mode] = {**mine[-1], **spread([t for r in mine for t in r["times"]]),
                              "run_medians_ms": [statistics.median(r["times"]) for r in mine]}
        del row["modes"][mode]["times"]
    off, on = row["modes"]["off"]["median_ms"], row["modes"]["guard"]["median_ms"]
    row["guard_overhead"] = on / off - 1
    return row


def render(results: dict[str, Any]) -> str:
    meta = results["versions"]
    lines = [f"{meta['device']}, {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, TE"
             f" {meta['te']}. {meta['model']}, BF16, experts frozen, batch 1 x {meta['seq']} tokens, fused AdamW,"
             f" {meta['steps']} steps a run after {meta['warmup']}, {meta['repeats']} runs without and with the"
             f" guard alternated{', CUDA graphs on' if meta.get('cuda_graphs') else ''};"
             " `benchmarks/guard_snapshot.py`.", "",
             "| fine-tune (plan) | trainable | snapshot | its cost (host + copy) | interval, its share of step time |"
             " step without the guard | with the guard | as often as possible | restore | pinned host memory"
             " (allocated in) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['finetune']} | failed: {r['error']} | | | | | | | | |")
            continue
        off, guard, every = (r["modes"][m] for m in MODES)
        stats = guard["guard"]
        share = "-" if stats["cost_share"] is None else f"{stats['cost_share']:.2%}"

        def step(mode: dict[str, Any]) -> str:
            return f"{mode['median_ms']:.1f} ms ({mode['min_ms']:.1f}-{mode['max_ms']:.1f})"

        lines.append(f"| {r['finetune']} ({off['plan']}) | {r['trainable_params'] / 1e6:,.1f} M |"
                     f" {stats['snapshot_bytes'] / 2**20:,.1f} MiB | {stats['snapshot_ms']} ms |"
                     f" every {stats['interval']}, {share} | {step(off)} | {step(guard)}"
                     f" ({r['guard_overhead']:+.1%}) | {step(every)} | {every['restore_ms']:.0f} ms |"
                     f" {guard['pinned_host_bytes'] / 2**30:.2f} GiB ({guard['host_alloc_ms']:.0f} ms) |")
    return "\n".join(lines)


def versions(device: torch.device) -> dict[str, Optional[str]]:
    import transformers

    try:
        import transformer_engine

        te: Optional[str] = transformer_engine.__version__
    except ImportError:
        te = None
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "te": te,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--finetunes", nargs="*", default=["lora", "attention"], choices=["lora", "attention"])
    parser.add_argument("--recipe", default="auto", help="the plugin's recipe (default: its plan for this machine)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs without and with the guard, alternated")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small model (checks the script, e.g. on a CPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the plugin's CUDA graphs in every mode: a GPU-bound step, where the guard's own per-step"
                             " cost shows (needs --warmup above the capture step)")
    args = parser.parse_args()
    if args.cuda_graphs and args.warmup <= WARMUP_CALLS:
        parser.error(f"--cuda-graphs needs --warmup {WARMUP_CALLS + 1} or more: the layers capture at step"
                     f" {WARMUP_CALLS + 1}, which must not be timed (got --warmup {args.warmup})")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = "A 2-layer small GPT-OSS" if args.tiny else "GPT-OSS-20B architecture"
    results: dict[str, Any] = {"versions": {**versions(device), "model": model, "seq": args.seq, "steps": args.steps,
                                            "warmup": args.warmup, "repeats": args.repeats,
                                            "cuda_graphs": args.cuda_graphs}, "rows": []}
    for finetune in args.finetunes:
        try:
            results["rows"].append(run(finetune, args, device))
        except Exception as err:  # e.g. out of memory: record it, measure the next fine-tune
            traceback.print_exc()
            results["rows"].append({"finetune": finetune, "error": f"{type(err).__name__}: {err}"[:200]})
        gc.collect()  # the model and its plugins refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (args.out / "guard_snapshot.json").write_text(json.dumps(results, indent=1, default=str))
    print(render(results))


if __name__ == "__main__":
    main()
