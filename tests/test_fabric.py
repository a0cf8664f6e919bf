"""``TEMoEFabricPrecision`` under Lightning Fabric: the plan, swaps and forward precision of the Trainer plugin, on one
process and on 2 CPU processes (gloo) under DDP and Fabric's ModelParallelStrategy (FSDP2), with its state saved and
loaded through Fabric's (sharded) checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experts_helpers import tiny_model
from lightning.fabric import Fabric

from lightning_te_moe import GroupedExperts, GuardConfig, TEMoEFabricPrecision


def test_one_process_fit_runs_the_plan_and_the_swaps() -> None:
    plugin = TEMoEFabricPrecision(print_plan=False)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = fabric.setup(tiny_model("gpt_oss").train())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ids = torch.randint(0, 64, (2, 9))
    logits = model(input_ids=ids).logits
    fabric.backward(logits.float().logsumexp(-1).mean())
    optimizer.step()
    assert sum(isinstance(m, GroupedExperts) for m in model.modules()) == 2
    assert plugin.plan is not None and logits.dtype == plugin.plan.ladder[0].dense.compute_dtype
    assert [d.kind for d in plugin.decisions.decisions][:2] == ["plan", "swap"]
    assert plugin.state_dict()["plan"] == plugin.plan.to_dict()


def test_the_guard_is_refused_with_the_reason() -> None:
    for name, value in (("guard", True), ("guard_config", GuardConfig())):
        with pytest.raises(TypeError, match=rf"TEMoEFabricPrecision\({name}=...\): Fabric has no callbacks"):
            TEMoEFabricPrecision(**{name: value})


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes(tmp_path: Path, kind: str) -> None:
    script = Path(__file__).with_name("fabric_script.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), kind], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["experts"] == 2 and rank["sharded"] == (kind == "fsdp2")
        assert rank["logits_dtype"] == "torch.bfloat16" or rank["plan"] == "fp32"
        assert rank["loaded_equal"] and rank["resumed_plan_equal"]
        first = ["plan", "swap", "shard"] if kind == "fsdp2" else ["plan", "swap"]
        assert rank["decisions"][:len(first)] == first and rank["resumed_decisions"] == first + ["resume"]
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["losses"] != ranks[1]["losses"]  # own data per rank
    if kind == "ddp":
        assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients all-reduced: the same weights
