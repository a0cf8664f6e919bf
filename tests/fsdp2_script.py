"""Run by tests/test_distributed_fsdp2.py: 2 CPU processes on gloo under Lightning's ModelParallelStrategy (FSDP2),
the tiny GPT-OSS sharded in ``configure_model`` by ``shard_model`` after the swaps.

    python fsdp2_script.py OUT_DIR

1. fit 8 steps, a NaN loss on rank 1 only at step 5 (values read a step late, as on CUDA: a rollback from each
   rank's own shards); a sharded (distributed checkpoint) save to OUT_DIR/ckpt; an HF export to OUT_DIR/hf;
2. a new Trainer resumes from OUT_DIR/ckpt to step 10.

Each rank writes OUT_DIR/rank<N>.json.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from guard_support import CpuLadderPrecision  # noqa: E402
from test_experts_fit import TinyGptOss  # noqa: E402

from lightning_te_moe import DivergenceGuard, GroupedExperts, GuardConfig  # noqa: E402
from lightning_te_moe.distributed import shard_model  # noqa: E402
from lightning_te_moe.distributed.export import export_hf, find_pretrained, full_state_dict  # noqa: E402

NAN_AT = 5


class ShardedGptOss(TinyGptOss):
    def configure_model(self) -> None:
        shard_model(self)

    def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
        loss = super().training_step(batch, index)
        if self.global_step == NAN_AT and self.global_rank == 1:
            loss = loss * float("nan")
        return loss


def loader() -> torch.utils.data.DataLoader:
    data = torch.randint(0, 64, (48, 10), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(data, batch_size=4)


def run(out: Path, steps: int, ckpt: Path | None) -> tuple[Trainer, CpuLadderPrecision, ShardedGptOss]:
    plugin = CpuLadderPrecision(print_plan=False, guard_config=GuardConfig(snapshot_every=1))
    trainer = Trainer(max_steps=steps, plugins=[plugin], accelerator="cpu", devices=2,
                      strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                      default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = ShardedGptOss()
    trainer.fit(model, loader(), ckpt_path=ckpt)
    return trainer, plugin, model


def decisions(plugin: CpuLadderPrecision) -> list[list]:
    return [[d.kind, d.step, d.from_, d.to] for d in plugin.decisions.decisions if d.kind not in ("swap", "snapshot")]


def main(out: Path) -> None:
    DivergenceGuard._reads_late = staticmethod(lambda device: True)
    trainer, plugin, model = run(out, 8, None)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    first = decisions(plugin)
    shard = next(d for d in plugin.decisions.decisions if d.kind == "shard")
    trainer.save_checkpoint(out / "ckpt")
    export_hf(model, out / "hf")
    full = full_state_dict(find_pretrained(model))
    exported = {}
    if trainer.global_rank == 0:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
        exported = {"keys_equal": sorted(loaded) == sorted(full),
                    "values_equal": all(torch.equal(loaded[k], full[k].to(loaded[k].dtype)) for k in full),
                    "experts_key": "model.layers.0.mlp.experts.gate_up_proj" in loaded}
    params = torch.cat([p.to_local().detach().flatten() for p in model.parameters()])
    result = {
        "experts": len(experts), "experts_units": all(isinstance(m, FSDPModule) for m in experts),
        "dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "experts_local_shape": list(experts[0].fc1.weight.to_local().shape),
        "experts_full_shape": list(experts[0].fc1.weight.shape),
        "shard": shard.evidence, "decisions": first, "rung": plugin.state.index,
        "global_step": trainer.global_step, "finite": bool(torch.isfinite(params).all()), "exported": exported,
        "guard": plugin.guard.guard_state()["rollbacks"], "planned_sharded": plugin.state.plan.request["sharded"],
    }
    resumed_trainer, resumed, _ = run(out, 10, out / "ckpt")
    result["resumed"] = {"decisions": decisions(resumed), "rung": resumed.state.index,
                         "global_step": resumed_trainer.global_step, "plan": resumed.state.plan.summary(),
                         "plan_equal": resumed.state.plan.to_dict() == plugin.state.plan.to_dict(),
                         "rollbacks": resumed.guard.guard_state()["rollbacks"]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # gloo's threads joined before exit: without it one rank aborted
        torch.distributed.destroy_process_group()  # at exit once ("terminate called without an active exception")
