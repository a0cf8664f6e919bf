"""Run by tests/test_fabric.py: Lightning Fabric on 2 CPU processes (gloo) with ``TEMoEFabricPrecision``, the tiny
GPT-OSS under DDP or Fabric's ModelParallelStrategy (FSDP2, ``fully_shard_units`` in the parallelize_fn): 3 steps, a
save with the precision state, a load into a second model, and the precision state into a fresh plugin.

    python fabric_script.py OUT_DIR ddp|fsdp2

Each rank writes OUT_DIR/rank<N>.json.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from experts_helpers import tiny_model  # noqa: E402

from lightning_te_moe import GroupedExperts, TEMoEFabricPrecision  # noqa: E402
from lightning_te_moe.distributed.sharding import fully_shard_units  # noqa: E402


def fabric_for(kind: str, plugin: TEMoEFabricPrecision) -> Fabric:
    def parallelize(model: torch.nn.Module, mesh: object) -> torch.nn.Module:
        _, summary, details = fully_shard_units(model, plugin.plan, [model], mesh["data_parallel"])
        plugin.decisions.record("shard", summary, rule="sharding", evidence=details)
        return model

    strategy = (ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2"
                else DDPStrategy())
    return Fabric(accelerator="cpu", devices=2, strategy=strategy, plugins=[plugin])


def main(out: Path, kind: str) -> None:
    plugin = TEMoEFabricPrecision(print_plan=False)
    fabric = fabric_for(kind, plugin)
    fabric.launch()
    model = fabric.setup(tiny_model("gpt_oss").train())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    data = torch.randint(0, 64, (3, 4, 10), generator=torch.Generator().manual_seed(fabric.global_rank))
    losses = []
    for batch in data:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        dtype = str(logits.dtype)
    fabric.save(out / "ckpt", {"model": model, "optimizer": optimizer, "precision": plugin.state_dict()})

    model2 = fabric.setup(tiny_model("gpt_oss", seed=3).train())  # a second model, swapped and sharded alike
    optimizer2 = fabric.setup_optimizers(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    state = {"model": model2, "optimizer": optimizer2, "precision": {}}
    fabric.load(out / "ckpt", state)
    fresh = TEMoEFabricPrecision(print_plan=False)  # a new run's plugin takes the saved plan, rung and history
    fresh.load_state_dict(state["precision"])
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    local2 = [p.to_local() if hasattr(p, "to_local") else p for p in model2.parameters()]
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps({
        "experts": len(experts), "sharded": all(hasattr(p, "to_local") for p in model.parameters()),
        "plan": plugin.plan.summary(), "logits_dtype": dtype, "losses": losses,
        "decisions": [d.kind for d in plugin.decisions.decisions],
        "checksum": float(sum(p.detach().double().sum() for p in local)),
        "loaded_equal": all(torch.equal(a, b) for a, b in zip(local, local2)),
        "resumed_decisions": [d.kind for d in fresh.decisions.decisions],
        "resumed_plan_equal": fresh.plan.to_dict() == plugin.plan.to_dict(),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    if torch.distributed.is_initialized():  # gloo's threads joined before exit: without it one rank aborted
        torch.distributed.destroy_process_group()  # at exit once ("terminate called without an active exception")
