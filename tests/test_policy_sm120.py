"""DGX Spark and other SM120/SM121 machines: the plan follows the evidence (TE #2382, #2372, PR #3195, PR #2644,
PR #2693). There is no SM120 machine here: these policy tests are the proof."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lightning_te_moe import Environment, PlanError, PrecisionRequest, RecipeSpec, make_plan
from lightning_te_moe.cli import main
from lightning_te_moe.policy import rules

NVFP4_SM120 = RecipeSpec("nvfp4", {"disable_rht": True, "disable_stochastic_rounding": True})


def _spark(cc: str, cudnn: str = "9.18.1", te: str = "2.20.2") -> Environment:
    return Environment.assume(cc=cc, te=te, cudnn=cudnn)


def _rules(plan) -> set[str]:
    return {r.rule for r in plan.reasons}


@pytest.mark.parametrize("cudnn", ["9.14.0", "9.18.0", "9.18.1", "9.20.0"])
@pytest.mark.parametrize("cc", ["12.0", "12.1"])
def test_default_plan_nvfp4_without_rht_or_sr_and_bf16_experts(cc: str, cudnn: str) -> None:
    """No opt-in: dense NVFP4 (disable_rht, stochastic rounding off), experts BF16, ladder NVFP4 -> NVFP4 with a
    high-precision backward -> BF16; fused attention only with cuDNN >= 9.18.1."""
    plan = make_plan(_spark(cc, cudnn))
    assert plan.dense == NVFP4_SM120 and plan.experts == RecipeSpec.of("bf16")
    assert [(r.dense.name, r.dense.backward_override, r.experts.label()) for r in plan.ladder] == [
        ("nvfp4", None, "bf16"), ("nvfp4", "dequantized", "bf16"), ("bf16", None, "bf16")]
    assert plan.ladder[1].dense.settings["disable_rht"] and plan.ladder[1].dense.settings["disable_stochastic_rounding"]
    assert {"sm120-order", "sm120-nvfp4-no-rht", "sm120-nvfp4-no-sr", "sm120-experts-no-nvfp4"} <= _rules(plan)
    assert "sm120-fp8-unproven" in _rules(plan)  # why the experts do not take FP8 current scaling either
    fused_ok = cudnn in ("9.18.1", "9.20.0")
    assert plan.fused_attention is fused_ok
    assert (plan.env_vars.get("NVTE_FUSED_ATTN") == "0") is not fused_ok
    assert ("sm120-fused-attn-cudnn" in _rules(plan)) is not fused_ok
    assert all(r.experts_gemm == "split" for r in plan.ladder)  # TE's native grouped GEMM stops at CC 11.0


@pytest.mark.parametrize("cudnn", ["9.14.0", "9.18.1"])
@pytest.mark.parametrize("cc", ["12.0", "12.1"])
def test_allowing_fp8_current_gives_the_experts_fp8_with_a_warning(cc: str, cudnn: str) -> None:
    plan = make_plan(_spark(cc, cudnn), PrecisionRequest(allow=("nvfp4", "fp8_current", "bf16")))
    assert plan.dense == NVFP4_SM120 and plan.experts == RecipeSpec.of("fp8_current")
    assert [r.experts.label() for r in plan.ladder] == ["fp8_current", "fp8_current+dq_bwd", "bf16"]
    warning = next(r for r in plan.reasons if r.rule == "sm120-fp8-unproven")
    assert "unproven on SM120" in warning.text and warning.ref.startswith("TE #2382")


@pytest.mark.parametrize("cc", ["12.0", "12.1"])
def test_allow_without_nvfp4(cc: str) -> None:
    """allow names fp8_current but not nvfp4: FP8 current scaling everywhere, with the warning; allow without
    fp8_current keeps the experts BF16."""
    fp8 = make_plan(_spark(cc), PrecisionRequest(allow=("fp8_current", "bf16")))
    assert fp8.summary() == "fp8_current -> fp8_current+dq_bwd -> bf16" and "sm120-fp8-unproven" in _rules(fp8)
    plain = make_plan(_spark(cc), PrecisionRequest(allow=("nvfp4", "bf16")))
    assert plain.dense.name == "nvfp4" and plain.experts.name == "bf16"
    assert make_plan(_spark(cc), PrecisionRequest(deny=("nvfp4",))).summary() == "bf16"


def test_bf16_parameters_get_the_high_precision_backward() -> None:
    plan = make_plan(_spark("12.1"), PrecisionRequest(params_dtype="bfloat16"))
    assert plan.ladder[1].dense.backward_override == "high_precision"  # TE's "unquant" backward, PR #2644
    assert plan.ladder[1].label().startswith("nvfp4+hp_bwd(")


def test_naming_a_recipe_lifts_the_unproven_rule_but_not_the_broken_ones() -> None:
    env = _spark("12.1")
    named = make_plan(env, PrecisionRequest(recipe="fp8_current"))
    assert named.summary() == "fp8_current -> fp8_current+dq_bwd -> bf16" and "sm120-fp8-unproven" in _rules(named)
    for recipe, rule in (("fp8_block", "sm120-no-block"), ("mxfp8", "sm120-no-mxfp8")):
        with pytest.raises(PlanError, match=rule):
            make_plan(env, PrecisionRequest(recipe=recipe))
        stepped = make_plan(env, PrecisionRequest(recipe=recipe, strict=False))
        assert stepped.dense.name == "bf16"  # FP8 current scaling is unproven here and was not named
        assert any(r.rule == rule and "Stepped down to bf16" in r.text for r in stepped.reasons)


def test_nvfp4_passed_with_rht_is_refused_or_fixed() -> None:
    class NVFP4BlockScaling:  # stands in for TE's class: only the type name and fields are read
        disable_rht = False
        backward_override = None

    class Fixed(NVFP4BlockScaling):
        disable_rht = True
        disable_stochastic_rounding = True

    Fixed.__name__ = "NVFP4BlockScaling"
    env = _spark("12.1")
    with pytest.raises(PlanError, match="disable_rht=False.*sm120-nvfp4-no-rht"):
        make_plan(env, PrecisionRequest(recipe=NVFP4BlockScaling()))
    assert make_plan(env, PrecisionRequest(recipe=NVFP4BlockScaling(), strict=False)).dense == NVFP4_SM120
    assert make_plan(env, PrecisionRequest(recipe=Fixed())).dense == NVFP4_SM120  # already right: accepted as is


def test_old_te_on_sm120() -> None:
    """TE < 2.14 keeps fused attention off on SM120 (PR #2693); TE < 2.15 has no backward_override (PR #2644)."""
    plan = make_plan(_spark("12.1", te="2.13.0"))
    assert not plan.fused_attention and "sm120-fused-attn-te" in _rules(plan)
    assert plan.summary() == "nvfp4(disable_rht=True, disable_stochastic_rounding=True) / experts bf16 -> bf16"
    assert "backward-override-needs-2.15" in _rules(plan)


def test_rules_lift_when_a_te_release_fixes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting te_fixed_in on a rule (when TE fixes RHT on SM120, say in 2.22) changes the plan from that TE on."""
    lifted = tuple(dataclasses.replace(r, when=dataclasses.replace(r.when, te_fixed_in="2.22"))
                   if r.id == "sm120-nvfp4-no-rht" else r for r in rules.RULES)
    monkeypatch.setattr(rules, "RULES", lifted)
    before, after = make_plan(_spark("12.1", te="2.21.0")), make_plan(_spark("12.1", te="2.22.0"))
    assert before.dense == NVFP4_SM120
    assert after.dense == RecipeSpec("nvfp4", {"disable_rht": False, "disable_stochastic_rounding": True})
    assert "sm120-nvfp4-no-rht" not in _rules(after)


def test_cli_plan_for_dgx_spark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--assume-cc", "12.1", "--assume-te", "2.20.2", "--assume-cudnn", "9.18.1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dense"] == NVFP4_SM120.to_dict() and plan["experts"]["name"] == "bf16"
    assert [r["experts"]["name"] for r in plan["ladder"]] == ["bf16", "bf16", "bf16"]
    assert plan["fused_attention"] is True and plan["env_vars"] == {}


def test_dgx_spark_page_shows_todays_plan() -> None:
    """docs/dgx-spark.md quotes the plan a DGX Spark gets; it must be the one make_plan gives."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "dgx-spark.md").read_text()
    block = doc[doc.index("<!-- dgx-spark-plan:begin -->"):doc.index("<!-- dgx-spark-plan:end -->")]
    plan, old_cudnn = make_plan(_spark("12.1")), make_plan(_spark("12.1", cudnn="9.14.0"))
    assert f"- dense layers: `{plan.dense.label()}`" in block
    assert f"- experts: `{plan.experts.label()}` (one GEMM per expert)" in block and plan.experts_gemm == "split"
    assert f"- ladder: `{plan.summary()}`" in block
    assert plan.fused_attention and not old_cudnn.fused_attention and old_cudnn.env_vars == {"NVTE_FUSED_ATTN": "0"}
