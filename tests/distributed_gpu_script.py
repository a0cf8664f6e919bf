"""Run by tests/gpu/test_distributed_gpu.py: 2 GPUs (NCCL), the tiny GPT-OSS with the plugin under FSDPStrategy (v1)
or ModelParallelStrategy (FSDP2, ``shard_model`` in configure_model), 6 steps of ``RECIPE``, NaN loss on rank 1 at
step 3.

    python distributed_gpu_script.py OUT_DIR fsdp|fsdp2 RECIPE

Each rank writes OUT_DIR/rank<N>.json: its decisions, how the experts were wrapped, the plan's rules, finiteness, and
what the experts' TE engines keep quantized between calls.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from test_experts_fit import TinyGptOss  # noqa: E402

from lightning_te_moe import GroupedExperts, GuardConfig, TEMoEPrecision  # noqa: E402
from lightning_te_moe.distributed import shard_model  # noqa: E402
from lightning_te_moe.norms import TERMSNorm  # noqa: E402


class Sharded(TinyGptOss):
    def configure_model(self) -> None:
        shard_model(self)


def main(out: Path, kind: str, recipe: str) -> None:
    class Model(Sharded if kind == "fsdp2" else TinyGptOss):
        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            loss = super().training_step(batch, index)
            return loss * float("nan") if self.global_step == 3 and self.global_rank == 1 else loss

    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2"
                else FSDPStrategy())
    plugin = TEMoEPrecision(recipe, print_plan=False, guard_config=GuardConfig(snapshot_every=1))
    trainer = Trainer(max_steps=6, plugins=[plugin], accelerator="cuda", devices=2, strategy=strategy,
                      default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = Model()
    data = torch.randint(0, 64, (48, 33), generator=torch.Generator().manual_seed(0))  # 4 x 32 tokens: FP8 shapes
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    wrapped = [type(m).__name__ for m in trainer.strategy.model.modules()
               if isinstance(m, FullyShardedDataParallel) and isinstance(m.module, GroupedExperts)]
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "decisions": [[d.kind, d.step, d.from_, d.to] for d in plugin.decisions.decisions
                      if d.kind not in ("swap", "snapshot")],
        "experts": len(experts), "fsdp_units": len(wrapped),
        "fsdp2_units": sum(isinstance(m, FSDPModule) for m in experts),
        "rules": [r.rule for r in plugin.state.plan.reasons], "plan": plugin.state.plan.summary(),
        "finite": all(bool(torch.isfinite(p).all()) for p in params), "global_step": trainer.global_step,
        # quantized weights TE still holds between calls (its workspaces) or held for frozen weights: none when sharded
        "kept_quantized": sum(len(e.module._fp8_workspaces) for m in experts for e in m._engines.values())
        + sum(r._quantized is not None for m in experts for r in m._resident.values()),
        "cache_enabled": any(e.weight_cache.enabled for m in experts for e in m._engines.values()),
        "engines": sum(len(m._engines) for m in experts),
        "te_norms": sum(isinstance(m, TERMSNorm) for m in model.modules()),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
    if torch.distributed.is_initialized():  # gloo's threads joined before exit: without it one rank aborted
        torch.distributed.destroy_process_group()  # at exit once ("terminate called without an active exception")
