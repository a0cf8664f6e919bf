"""Attention swap decisions on CPU: the plan, the device and TE decide; unsupported attention is reported."""

from __future__ import annotations

import pytest
import torch

from lightning_te_moe import Environment, make_plan
from lightning_te_moe.attention import IMPLEMENTATION, plan_reason, swap_attention, swap_for_plugin, unswap_attention
from lightning_te_moe.attention.dispatch import SWAP_ATTR
from lightning_te_moe.policy.state import PrecisionState
from tests.experts_helpers import tiny_model


def _swapped(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if SWAP_ATTR in m.__dict__]


def test_cpu_plan_swaps_nothing_and_says_why(capsys):
    model = tiny_model("gpt_oss")
    assert swap_for_plugin(model, PrecisionState(make_plan(Environment.assume()))) is None
    assert "attention swap: attention of GptOssForCausalLM not swapped: device is cpu" in capsys.readouterr().out
    assert not _swapped(model) and model.config._attn_implementation == "eager"


def test_plan_without_fused_attention_swaps_nothing_and_names_the_rule():
    plan = make_plan(Environment.assume(cc="12.0", te="2.20.2", cudnn="9.14.0"))
    assert not plan.fused_attention
    model = tiny_model("gpt_oss")
    summary, details = swap_for_plugin(model, PrecisionState(plan))
    assert details["skipped"] and "sm120-fused-attn-cudnn" in summary and "TE PR #2693" in summary
    assert not _swapped(model)


def test_cuda_plan_without_te_swaps_nothing():
    assert "not installed" in plan_reason(make_plan(Environment.assume(cc="9.0")))


def test_cuda_plan_with_te_passes_the_plan_check():
    assert plan_reason(make_plan(Environment.assume(cc="9.0", te="2.20.2"))) is None


def test_cuda_plan_on_a_machine_without_importable_te_swaps_nothing(monkeypatch):
    import lightning_te_moe.attention.swap as swap_mod

    monkeypatch.setattr(swap_mod, "te_unavailable_reason", lambda: "Transformer Engine does not import (test)")
    model = tiny_model("gpt_oss")
    summary, _ = swap_for_plugin(model, PrecisionState(make_plan(Environment.assume(cc="9.0", te="2.20.2"))))
    assert "does not import" in summary and not _swapped(model)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_standard_attention_is_swapped_to_vanilla_softmax(arch):
    model = tiny_model(arch)
    report = swap_attention(model, core="reference")
    assert [e.detail for e in report.by_status("swapped")] == ["vanilla softmax, full causal"] * 2
    assert report.summary().startswith("swapped 2 attention layer(s)") and "TE fused attention" in report.summary()
    assert model.config._attn_implementation == IMPLEMENTATION and len(_swapped(model)) == 2
    assert unswap_attention(model) == 2 and model.config._attn_implementation == "eager"


def test_multi_head_latent_attention_is_kept_with_a_clear_report():
    model = tiny_model("deepseek_v3")
    report = swap_attention(model, core="reference")
    kept = report.by_status("kept")
    assert not report.by_status("swapped") and len(kept) == 2
    assert "multi-head latent attention" in kept[0].detail and report.summary().startswith("no attention swapped")
    assert not _swapped(model)


def test_model_without_attention_reports_nothing_found():
    report = swap_attention(torch.nn.Sequential(torch.nn.Linear(4, 4)), core="reference")
    assert report.summary() == "no attention layers found in Sequential: nothing changed"


def test_gpt_oss_swap_report_names_windows_and_unswap_restores():
    model = tiny_model("gpt_oss")
    report = swap_attention(model, core="reference")
    assert [e.detail for e in report.by_status("swapped")] == ["learnable softmax (sinks), sliding window 8",
                                                               "learnable softmax (sinks), full causal"]
    assert model.config._attn_implementation == IMPLEMENTATION
    again = swap_attention(model, core="reference")
    assert len(again.by_status("already swapped")) == 2 and "already swapped" in again.summary()
    assert unswap_attention(model) == 2
    assert model.config._attn_implementation == "eager" and not _swapped(model)


def test_only_eager_or_sdpa_models_are_swapped():
    model = tiny_model("gpt_oss")
    model.config._attn_implementation = "flex_attention"
    report = swap_attention(model, core="reference")
    assert len(report.by_status("kept")) == 2 and "flex_attention" in report.summary()
    assert not _swapped(model)


def test_plugin_on_cpu_prints_the_reason_and_plans_attention_as_the_models_own(capsys):
    from lightning_te_moe import TEMoEPrecision

    plugin = TEMoEPrecision(print_plan=False, guard=False, swap_experts=False)
    model = tiny_model("gpt_oss")
    plugin.convert_module(model)
    assert "device is cpu" in capsys.readouterr().out
    assert not plugin.plan.fused_attention and plugin.decisions.count("swap") == 0
    assert not _swapped(model)
    from lightning_te_moe.recompute import recompute_for_plugin

    swaps = TEMoEPrecision(swap_attention=False, swap_experts=False, swap_dense=False, swap_norms=False,
                           cuda_graphs=False).module_swaps
    assert swaps == [recompute_for_plugin]  # no module swap left, only the checkpointing wrapper
