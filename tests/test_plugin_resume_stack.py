"""A checkpoint planned on another CUDA stack (cuBLASLt decides the experts' GEMM path and measured recipe) is not
resumed as if the machine were the same."""

from __future__ import annotations

import torch

from lightning_te_moe import Environment, TEMoEPrecision, make_plan


def test_a_checkpoint_from_another_cublaslt_keeps_this_stacks_plan() -> None:
    here = make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"))
    there = make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.1.0"))
    assert here.experts.name == "fp8_current" and there.experts.name == "bf16"  # the stacks plan differently
    plugin = TEMoEPrecision(print_plan=False)
    plugin._set_up(here, torch.device("cpu"))
    plugin.load_state_dict({"plan": there.to_dict(), "rung": 0, "decisions": []})
    assert plugin.plan.summary() == here.summary() and plugin.state.index == 0
    last = plugin.decisions.decisions[-1]
    assert last.kind == "resume" and "keeping this machine's plan" in last.reason
    same = TEMoEPrecision(print_plan=False)
    same._set_up(here, torch.device("cpu"))
    same.load_state_dict({"plan": here.to_dict(), "rung": 1, "decisions": []})
    assert same.state.index == 1  # the same stack resumes the checkpoint's rung
