"""Measured auto: which experts recipes are timed and how the choice is made (timings injected, no GPU)."""

from __future__ import annotations

import pytest

from lightning_te_moe import Environment, PrecisionRequest
from lightning_te_moe.policy.autotune import autotune_plan, candidate_plans, choose

H100 = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")  # rule-based experts choice: fp8_current


def test_candidates_are_only_recipes_the_rules_allow():
    assert list(candidate_plans(H100, PrecisionRequest())) == ["fp8_current", "bf16", "fp8_delayed", "fp8_block"]
    spark = Environment.assume(cc="12.1", te="2.20.2")
    assert list(candidate_plans(spark, PrecisionRequest())) == ["bf16"]  # TE #2382, #2372; FP8 unproven there
    b200 = Environment.assume(cc="10.0", te="2.20.2")
    assert "nvfp4" not in candidate_plans(b200, PrecisionRequest())  # not without auto_nvfp4
    assert "nvfp4" in candidate_plans(b200, PrecisionRequest(auto_nvfp4=True))
    assert "fp8_delayed" not in candidate_plans(H100, PrecisionRequest(prefer_stability=True))


def test_bf16_wins_when_fp8_is_measured_slower():
    timings = {"fp8_current": 37.3, "bf16": 32.0, "fp8_delayed": 33.6, "fp8_block": 36.9}
    plan, result = autotune_plan(H100, PrecisionRequest(), lambda plan: timings[plan.experts.name])
    assert result.chosen == "bf16"
    assert plan.summary() == "fp8_current / experts bf16 -> fp8_current+dq_bwd / experts bf16 -> bf16"
    assert result.timings_ms == timings
    last = plan.reasons[-1]
    assert last.rule == "autotune" and "autotune chose bf16: 14% faster than the rule-based fp8_current" in last.text
    assert "bf16 32.00 ms, fp8_delayed 33.60 ms" in last.text
    assert plan.request["recipe"] == "auto" and plan.request["autotune"] is True
    assert all(r.rule != "request.experts" for r in plan.reasons)


def test_fp8_kept_and_ladder_follows_the_chosen_recipe():
    timings = {"fp8_current": 10.0, "bf16": 14.0, "fp8_delayed": 9.9, "fp8_block": 9.0}
    plan, result = autotune_plan(H100, PrecisionRequest(), lambda plan: timings[plan.experts.name])
    assert result.chosen == "fp8_block"
    assert plan.summary() == "fp8_current / experts fp8_block -> fp8_current+dq_bwd / experts fp8_block+dq_bwd -> bf16"


def test_noise_does_not_replace_the_rule_based_choice():
    choice, why = choose({"fp8_current": 10.0, "fp8_delayed": 9.8, "bf16": 12.0}, "fp8_current")
    assert choice == "fp8_current" and "autotune kept fp8_current" in why


def test_bad_inputs():
    with pytest.raises(ValueError, match="no timing for the rule-based choice 'bf16'"):
        choose({"fp8_current": 1.0}, "bf16")
    with pytest.raises(ValueError, match="autotune needs recipe='auto' and experts='auto'"):
        autotune_plan(H100, PrecisionRequest(recipe="bf16"), lambda plan: 1.0)
