"""FSDP2 under Lightning's ModelParallelStrategy on 2 CPU processes (gloo): the swaps run in configure_model before
fully_shard, each GroupedExperts module is its own FSDP unit, a NaN on one rank costs both ranks the same rollback
(from each rank's own shards), the sharded checkpoint resumes the plan, rung, guard state and decision history, and
the HF export loads back with transformers; the sharded checkpoint converts offline to the same HF weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_te_moe.distributed.export import export_checkpoint


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp2")
    script = Path(__file__).with_name("fsdp2_script.py")
    done = subprocess.run([sys.executable, str(script), str(out)], cwd=out, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_swaps_run_before_fully_shard_and_each_experts_module_is_a_unit(fsdp2_run: tuple[Path, list[dict]]) -> None:
    for rank in fsdp2_run[1]:
        assert rank["experts"] == 2 and rank["experts_units"] and rank["dtensor"]
        assert rank["planned_sharded"] is True  # the plan was made knowing the strategy shards (rules differ there)
        assert rank["experts_full_shape"] == [8, 96, 32] and rank["experts_local_shape"] == [4, 96, 32]
        assert rank["shard"] == {"strategy": "fsdp2", "ranks": 2, "experts_units": 2, "layer_units": 2, "roots": 1,
                                 "param_dtype": "None", "reduce_dtype": "torch.float32"}  # the ladder has FP32


def test_nan_on_one_rank_rolls_both_ranks_back_at_the_same_step(fsdp2_run: tuple[Path, list[dict]]) -> None:
    ranks = fsdp2_run[1]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] == [
        ["plan", 0, "", "bf16"], ["shard", 0, "", ""], ["rollback", 6, "step 6", "step 3"]]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    assert ranks[0]["finite"] and ranks[1]["finite"] and ranks[0]["guard"] == ranks[1]["guard"] == 1


def test_sharded_checkpoint_resumes_plan_rung_guard_and_history(fsdp2_run: tuple[Path, list[dict]]) -> None:
    out, ranks = fsdp2_run
    assert (out / "ckpt").is_dir() and (out / "ckpt" / "meta.pt").is_file()  # a distributed checkpoint
    for rank in ranks:
        resumed = rank["resumed"]
        assert resumed["decisions"] == rank["decisions"] + [["resume", 8, "", "bf16"]]
        assert resumed["plan_equal"] and resumed["rung"] == 0 and resumed["rollbacks"] == 1
        assert resumed["global_step"] == 10


def test_hf_export_loads_with_from_pretrained(fsdp2_run: tuple[Path, list[dict]]) -> None:
    assert fsdp2_run[1][0]["exported"] == {"keys_equal": True, "values_equal": True, "experts_key": True}


def test_sharded_checkpoint_converts_offline_to_the_same_hf_weights(fsdp2_run: tuple[Path, list[dict]],
                                                                     tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = fsdp2_run[0]
    converted = export_checkpoint(out / "ckpt", tmp_path / "hf", config=out / "hf", prefix="model.")
    live = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    offline = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    assert sorted(offline) == sorted(live) and all(torch.equal(offline[k], live[k]) for k in live)
    with pytest.raises(ValueError, match="prefix='nothing.'.*top-level prefixes are"):
        export_checkpoint(out / "ckpt", tmp_path / "bad", config=out / "hf", prefix="nothing.")
