"""Table-driven tests of the policy: every supported device class x TE version, and the user's wishes."""

from __future__ import annotations

import re

import pytest

from lightning_te_moe import Environment, PlanError, PrecisionRequest, make_plan
from lightning_te_moe.policy.plan import Plan
from lightning_te_moe.policy.environment import TECheck
from lightning_te_moe.policy.measurements import MEASUREMENTS
from lightning_te_moe.policy.rules import RULES

RULE_IDS = {r.id for r in RULES}

# (compute capability, TE version, expected ladder) for the default request (recipe="auto"), with the assumed GPU's
# default cuBLASLt (13.0: TE's split path on Hopper, where the experts' measured fastest recipe is BF16, and FP8 dense
# layers measured slower than BF16: rule hopper-split-dense-bf16); other stacks: test_auto_plan_on_hopper_per_cuda_stack
# Read each row as a claim about that machine; the reasons are checked in the tests below.
SPARK = "nvfp4(disable_rht=True, disable_stochastic_rounding=True) / experts bf16"
SPARK_LADDER = f"{SPARK} -> nvfp4+dq_bwd(disable_rht=True, disable_stochastic_rounding=True) / experts bf16 -> bf16"
HOPPER_NATIVE_LADDER = "fp8_current -> fp8_current+dq_bwd -> bf16"
AUTO = [
    (None, None, 'fp32'),
    (None, '2.8', 'fp32'),
    (None, '2.9', 'fp32'),
    (None, '2.14', 'fp32'),
    (None, '2.15', 'fp32'),
    (None, '2.20', 'fp32'),
    ('7.0', None, 'fp16 -> fp32'),
    ('7.0', '2.8', 'fp16 -> fp32'),
    ('7.0', '2.9', 'fp16 -> fp32'),
    ('7.0', '2.14', 'fp16 -> fp32'),
    ('7.0', '2.15', 'fp16 -> fp32'),
    ('7.0', '2.20', 'fp16 -> fp32'),
    ('8.0', None, 'bf16'),
    ('8.0', '2.8', 'bf16'),
    ('8.0', '2.9', 'bf16'),
    ('8.0', '2.14', 'bf16'),
    ('8.0', '2.15', 'bf16'),
    ('8.0', '2.20', 'bf16'),
    ('8.6', None, 'bf16'),
    ('8.6', '2.8', 'bf16'),
    ('8.6', '2.9', 'bf16'),
    ('8.6', '2.14', 'bf16'),
    ('8.6', '2.15', 'bf16'),
    ('8.6', '2.20', 'bf16'),
    ('8.9', None, 'bf16'),
    ('8.9', '2.8', 'bf16'),
    ('8.9', '2.9', 'fp8_current -> bf16'),
    ('8.9', '2.14', 'fp8_current -> bf16'),
    ('8.9', '2.15', 'fp8_current -> fp8_current+dq_bwd -> bf16'),
    ('8.9', '2.20', 'fp8_current -> fp8_current+dq_bwd -> bf16'),
    ('9.0', None, 'bf16'),
    ('9.0', '2.8', 'bf16'),
    ('9.0', '2.9', 'fp8_current -> bf16'),  # one process with TE: CUDA graphs, so FP8 (cuda-graphs-one-process)
    ('9.0', '2.14', 'fp8_current -> bf16'),
    ('9.0', '2.15', 'fp8_current / experts bf16 -> fp8_current+dq_bwd / experts bf16 -> bf16'),
    ('9.0', '2.20', 'fp8_current / experts bf16 -> fp8_current+dq_bwd / experts bf16 -> bf16'),
    ('10.0', None, 'bf16'),
    ('10.0', '2.8', 'bf16'),
    ('10.0', '2.9', 'mxfp8 -> bf16'),
    ('10.0', '2.14', 'mxfp8 -> bf16'),
    ('10.0', '2.15', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('10.0', '2.20', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('10.3', None, 'bf16'),
    ('10.3', '2.8', 'bf16'),
    ('10.3', '2.9', 'mxfp8 -> bf16'),
    ('10.3', '2.14', 'mxfp8 -> bf16'),
    ('10.3', '2.15', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('10.3', '2.20', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('11.0', None, 'bf16'),
    ('11.0', '2.8', 'bf16'),
    ('11.0', '2.9', 'mxfp8 -> bf16'),
    ('11.0', '2.14', 'mxfp8 -> bf16'),
    ('11.0', '2.15', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('11.0', '2.20', 'mxfp8 -> mxfp8+dq_bwd -> bf16'),
    ('12.0', None, 'bf16'),
    ('12.0', '2.8', 'bf16'),
    ('12.0', '2.9', f"{SPARK} -> bf16"),
    ('12.0', '2.14', f"{SPARK} -> bf16"),
    ('12.0', '2.15', SPARK_LADDER),
    ('12.0', '2.20', SPARK_LADDER),
    ('12.1', None, 'bf16'),
    ('12.1', '2.8', 'bf16'),
    ('12.1', '2.9', f"{SPARK} -> bf16"),
    ('12.1', '2.14', f"{SPARK} -> bf16"),
    ('12.1', '2.15', SPARK_LADDER),
    ('12.1', '2.20', SPARK_LADDER),
]
#: Reason ids that are not rules: the user's request, auto's pick, the ladder, the measurements, the GEMM path.
NOT_RULES = {"auto", "ladder", "grouped-gemm-alignment", "request.auto_nvfp4", "experts-gemm-split",
             *(m.id for m in MEASUREMENTS)}


@pytest.mark.parametrize(("cc", "te", "ladder"), AUTO)
def test_auto_plan_per_device_and_te_version(cc, te, ladder):
    plan = make_plan(Environment.assume(cc=cc, te=te))
    assert plan.summary() == ladder
    rules = {r.rule for r in plan.reasons}
    assert "auto" in rules and "ladder" in rules
    assert rules - NOT_RULES <= RULE_IDS
    if cc is None:
        assert "cpu-fp32" in rules and not plan.fused_attention
    elif te is None:
        assert "no-te" in rules
    if te == "2.8" and cc is not None:
        assert "te-below-floor" in rules and not plan.fused_attention
    if te in ("2.9", "2.14") and plan.dense.is_te:
        assert "backward-override-needs-2.15" in rules


@pytest.mark.parametrize(("cublaslt", "ladder"), [("13.1.0", "bf16"), ("13.4.0", "bf16"),
                                                  ("13.5.0", HOPPER_NATIVE_LADDER), ("13.10.0", HOPPER_NATIVE_LADDER)])
def test_auto_plan_on_hopper_per_cuda_stack(cublaslt: str, ladder: str) -> None:
    """Below cuBLASLt 13.5 (TE's split path for FP8 experts) FP8 dense layers and experts both measured slower than
    BF16 in an eager step (H100, 2026-11-27): without CUDA graphs auto runs BF16 and says why; a named FP8 recipe
    still runs FP8. On a current stack the dense layers keep the rules' order and the experts their measured
    fastest, FP8 current. One process on CUDA with TE runs graphs by default, where the dense layers keep FP8."""
    env = Environment.assume(cc="9.0", te="2.20.2", cublaslt=cublaslt)
    plan = make_plan(env, PrecisionRequest(cuda_graphs=False))
    assert plan.summary() == ladder and not plan.cuda_graphs
    rule = next((r for r in plan.reasons if r.rule == "hopper-split-dense-bf16"), None)
    assert (rule is not None) is (ladder == "bf16")
    if rule is not None:
        assert "357.7 vs 291.5 ms" in rule.text and "1.15 vs 0.80 s" in rule.text
        assert make_plan(env, PrecisionRequest(recipe="fp8_current", cuda_graphs=False)).dense.name == "fp8_current"
    # measured eager only: with CUDA graphs (a GPU-bound step) the dense layers keep FP8 current
    for graphed in (make_plan(env), make_plan(env, PrecisionRequest(cuda_graphs=True))):
        assert graphed.dense.name == "fp8_current" and graphed.cuda_graphs
        assert "hopper-split-dense-bf16" not in {r.rule for r in graphed.reasons}
    assert "cuda-graphs-one-process" in {r.rule for r in make_plan(env).reasons}
    assert make_plan(env, PrecisionRequest(cuda_graphs=True)).request["cuda_graphs"] is True


@pytest.mark.parametrize(("cc", "cublaslt", "recompute"), [("9.0", "13.1.0", True), ("9.0", "13.10.0", True),
                                                           ("10.0", "13.10.0", False), ("12.0", "13.10.0", False)])
def test_what_a_step_out_of_memory_does_first_follows_the_measurements(cc: str, cublaslt: str, recompute: bool) -> None:
    """Measured at 8 x 1,024 tokens (H200 capped at 78.5 GiB, 2026-11-28): on Hopper recomputing inside the graphs
    fit at 98% GPU busy on cuBLASLt 13.1 and 13.10 (there once the fallback packs the quantized copies anew); elsewhere
    it was not measured and the plan drops the graphs first. The plan says which, with the rule's reason and the row
    of the plan table; without graphs there is nothing to say; the plan keeps it through a checkpoint; the plugin's
    memory fallback takes that ladder."""
    import torch
    from experts_helpers import tiny_model

    from lightning_te_moe import TEMoEPrecision
    from lightning_te_moe.graphs import install_cuda_graphs

    env = Environment.assume(cc=cc, te="2.20.2", cublaslt=cublaslt)
    plan = make_plan(env)
    assert plan.cuda_graphs and plan.graphed_recompute is recompute
    assert ("graphed-recompute-hopper" in {r.rule for r in plan.reasons}) is recompute
    assert Plan.from_dict(plan.to_dict()).graphed_recompute is recompute
    row = "recompute inside the graphs, then eager checkpointing" if recompute else "graphs off, then eager"
    assert row in plan.render_text(width=250)
    eager = make_plan(env, PrecisionRequest(cuda_graphs=False))
    assert not eager.graphed_recompute and not any(r.rule.startswith("graphed-recompute") for r in eager.reasons)
    assert "out of memory" not in eager.render_text(width=250)
    plugin = TEMoEPrecision(print_plan=False)
    plugin._set_up(plan, torch.device("cpu"))
    model = tiny_model("gpt_oss").train()
    install_cuda_graphs(model)
    failures = iter([True, False])

    def closure() -> str:
        if next(failures):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return "loss"

    assert plugin.memory.run(closure, model) == "loss"
    assert plugin.memory.taken == ["graphs_recompute" if recompute else "cuda_graphs_off"]


def test_cuda_graphs_by_default_where_one_process_runs_cuda_with_te() -> None:
    """Graphs are the plan's default for one process on CUDA with TE (measured host-bound without them), off with
    several processes, under torch.compile, without TE and on the CPU; the user's cuda_graphs= wins and is the
    reason given; the plan carries the outcome through a checkpoint (to_dict / from_dict)."""
    hopper = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.1.0")

    def graphs(env: Environment, **request: object) -> tuple[bool, set[str]]:
        plan = make_plan(env, PrecisionRequest(**request))
        assert Plan.from_dict(plan.to_dict()).cuda_graphs == plan.cuda_graphs
        return plan.cuda_graphs, {r.rule for r in plan.reasons}

    on, rules = graphs(hopper)
    assert on and "cuda-graphs-one-process" in rules
    for request, rule in (({"processes": 2}, "cuda-graphs-several-processes"),
                          ({"sharded": True}, "cuda-graphs-several-processes"),
                          ({"torch_compile": True}, "cuda-graphs-compile")):
        off, rules = graphs(hopper, **request)
        assert not off and rule in rules, request
    on, rules = graphs(hopper, processes=2, cuda_graphs=True)
    assert on and "request.cuda_graphs" in rules and "cuda-graphs-several-processes" not in rules
    off, rules = graphs(hopper, cuda_graphs=False)
    assert not off and "request.cuda_graphs" in rules and "cuda-graphs-one-process" not in rules
    off, rules = graphs(Environment.assume(cc="9.0", te=None))
    assert not off and "no-te" in rules
    cpu, rules = graphs(Environment.assume(cc="cpu"))
    assert not cpu and not any(rule.startswith("cuda-graphs") for rule in rules)
    assert "CUDA graphs" in make_plan(hopper).render_text() and "CUDA graphs" not in make_plan(
        Environment.assume(cc="cpu")).render_text()


@pytest.mark.parametrize("cublaslt", ["13.1.0", "13.10.0"])
def test_sharded_parameters_on_hopper_run_bf16_unless_fp8_is_named(cublaslt: str) -> None:
    """Under FSDP/FSDP2 every FP8 plan measured slower than BF16 at full size (4 x H200, cuBLASLt 13.10: 0.97-0.98 vs
    0.66 s; 4 x H100, 13.1: 1.15 vs 0.80 s): auto plans BF16 for the dense layers and the experts (not the single
    layer's measured fastest) and says why; a named FP8 recipe still runs FP8, with the rule as its warning; without
    sharding, and on Blackwell (not measured), the plan is what it was."""
    env = Environment.assume(cc="9.0", te="2.20.2", cublaslt=cublaslt)
    sharded = make_plan(env, PrecisionRequest(sharded=True))
    assert sharded.summary() == "bf16" and sharded.experts.name == "bf16" and sharded.request["sharded"] is True
    why = [r for r in sharded.reasons if r.rule == "hopper-sharded-bf16"]
    assert why and "0.97-0.98 s a step and 103.8 GiB against BF16's 0.66 s and 68.2 GiB" in why[0].text
    named = make_plan(env, PrecisionRequest(recipe="fp8_current", sharded=True))
    assert named.dense.name == "fp8_current" and "hopper-sharded-bf16" in {r.rule for r in named.reasons}
    assert make_plan(env).summary() == make_plan(env, PrecisionRequest(sharded=False)).summary()
    if cublaslt == "13.10.0":
        assert make_plan(env).dense.name == "fp8_current"  # unsharded: the current stack's FP8 plan
    blackwell = Environment.assume(cc="10.0", te="2.20.2", cublaslt=cublaslt)
    assert make_plan(blackwell, PrecisionRequest(sharded=True)).summary() == make_plan(blackwell).summary()


@pytest.mark.parametrize("cudnn", ["9.14.0", "9.18.0", "9.18.1", "9.20.0"])
@pytest.mark.parametrize("cc", ["12.0", "12.1"])
def test_sm120_fused_attention_needs_cudnn_9_18_1(cc, cudnn):
    plan = make_plan(Environment.assume(cc=cc, te="2.20.2", cudnn=cudnn))
    fused_ok = cudnn in ("9.18.1", "9.20.0")
    assert plan.fused_attention is fused_ok
    assert (plan.env_vars.get("NVTE_FUSED_ATTN") == "0") is not fused_ok
    assert ("sm120-fused-attn-cudnn" in {r.rule for r in plan.reasons}) is not fused_ok


def test_sm120_fused_attention_needs_te_2_14():
    plan = make_plan(Environment.assume(cc="12.1", te="2.13.0", cudnn="9.18.1"))
    assert not plan.fused_attention and "sm120-fused-attn-te" in {r.rule for r in plan.reasons}


def test_hopper_fused_attention_on():
    plan = make_plan(Environment.assume(cc="9.0", te="2.20.2"))
    assert plan.fused_attention and not plan.env_vars


@pytest.mark.parametrize(("cc", "te", "experts"), [("10.0", "2.16.0", "mxfp8"), ("10.0", "2.17.0", "nvfp4"),
                                                   ("10.0", "2.20.2", "nvfp4"), ("11.0", "2.16.0", "mxfp8")])
def test_blackwell_nvfp4_experts_follow_grouped_gemm_support(cc, te, experts):
    plan = make_plan(Environment.assume(cc=cc, te=te), PrecisionRequest(auto_nvfp4=True))
    assert plan.dense.name == "nvfp4" and plan.experts.name == experts
    assert ("experts-no-nvfp4-grouped" in {r.rule for r in plan.reasons}) is (experts != "nvfp4")
    assert plan.experts.alignment == {"mxfp8": 32, "nvfp4": 128}[experts]


def test_blackwell_mxfp8_forced_to_e4m3_even_when_asked_otherwise():
    env = Environment.assume(cc="10.0", te="2.20.2")
    plan = make_plan(env, PrecisionRequest(recipe="mxfp8"))
    assert plan.dense.settings["fp8_format"] == "E4M3" and plan.experts.alignment == 32

    class MXFP8BlockScaling:  # stands in for TE's class: only the type name and fields are read
        fp8_format = type("Fmt", (), {"name": "HYBRID"})()
        backward_override = None

    with pytest.raises(PlanError, match="fp8_format='HYBRID'.*mxfp8-e4m3"):
        make_plan(env, PrecisionRequest(recipe=MXFP8BlockScaling()))
    fixed = make_plan(env, PrecisionRequest(recipe=MXFP8BlockScaling(), strict=False))
    assert fixed.dense.settings["fp8_format"] == "E4M3"


def test_hopper_explicit_recipes_and_ladders():
    env = Environment.assume(cc="9.0", te="2.20.2")
    assert make_plan(env, PrecisionRequest(recipe="fp8_delayed")).summary() == (
        "fp8_delayed -> fp8_current+dq_bwd -> bf16")
    assert make_plan(env, PrecisionRequest(recipe="fp8_block")).summary() == "fp8_block -> fp8_block+dq_bwd -> bf16"
    assert make_plan(env, PrecisionRequest(recipe="bf16")).summary() == "bf16"
    old = make_plan(Environment.assume(cc="9.0", te="2.14.1"), PrecisionRequest(recipe="fp8_delayed"))
    assert old.summary() == "fp8_delayed -> bf16"
    for name in ("mxfp8", "nvfp4"):
        with pytest.raises(PlanError, match="hopper-fp8"):
            make_plan(env, PrecisionRequest(recipe=name))


def test_hopper_block_scaling_needs_torch_cuda_12_9():
    env = Environment.assume(cc="9.0", te="2.20.2", torch_cuda="12.8")
    with pytest.raises(PlanError, match="block-needs-cuda-12.9"):
        make_plan(env, PrecisionRequest(recipe="fp8_block"))
    assert make_plan(Environment.assume(cc="9.0", te="2.20.2", torch_cuda="12.9"),
                     PrecisionRequest(recipe="fp8_block")).dense.name == "fp8_block"


def test_ada_fp8_needs_cublaslt_12_1_3():
    assert make_plan(Environment.assume(cc="8.9", te="2.20.2", cublaslt="12.1.0")).summary() == "bf16"
    assert make_plan(Environment.assume(cc="8.9", te="2.20.2", cublaslt="12.1.3")).dense.name == "fp8_current"


def test_delayed_scaling_rejected_under_torch_compile():
    env = Environment.assume(cc="9.0", te="2.20.2")
    with pytest.raises(PlanError, match="compile-no-delayed"):
        make_plan(env, PrecisionRequest(recipe="fp8_delayed", torch_compile=True))
    plan = make_plan(env, PrecisionRequest(deny=("fp8_current", "fp8_block"), torch_compile=True))
    assert plan.dense.name == "bf16"


def test_te_own_checks_forbid_with_te_reason():
    env = Environment(device_type="cuda", device_name="H100", compute_capability=(9, 0), torch_cuda="13.0",
                      te_version="2.20.2", cudnn_version="9.14.0", cublaslt_version="13.1.0",
                      te_checks={"fp8": TECheck(True), "fp8_block": TECheck(False, "needs CUDA >= 12.9"),
                                 "mxfp8": TECheck(False, "CC 10.0 required"), "nvfp4": TECheck(False, "CC 10.0")})
    with pytest.raises(PlanError, match="needs CUDA >= 12.9"):
        make_plan(env, PrecisionRequest(recipe="fp8_block"))


def test_prefer_stability_starts_with_high_precision_backward_and_skips_delayed():
    env = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")
    plan = make_plan(env, PrecisionRequest(prefer_stability=True, deny=("fp8_current", "fp8_block")))
    assert plan.summary() == "bf16"  # only fp8_delayed was left, and stability skips it
    plan = make_plan(env, PrecisionRequest(prefer_stability=True))
    assert plan.summary() == "fp8_current+dq_bwd -> bf16"
    assert any(r.rule == "request.prefer_stability" for r in plan.reasons)


def test_allow_and_deny_lists():
    env = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.1.0")
    eager = PrecisionRequest(allow=("bf16", "fp8_block"), cuda_graphs=False)
    assert make_plan(env, eager).summary() == "bf16"  # block measured slower
    assert make_plan(env, PrecisionRequest(allow=("fp8_block", "fp8_current"))).summary() == (
        "fp8_current / experts fp8_block -> fp8_current+dq_bwd / experts fp8_block+dq_bwd")  # each its own order
    assert make_plan(env, PrecisionRequest(allow=("fp8_block",))).summary() == (
        "fp8_block -> fp8_block+dq_bwd")  # the only measured recipe allowed; nothing below is allowed
    plan = make_plan(env, PrecisionRequest(allow=("fp8_current",)))
    assert plan.summary() == "fp8_current -> fp8_current+dq_bwd"
    with pytest.raises(PlanError, match="request.deny"):
        make_plan(env, PrecisionRequest(recipe="fp8_current", deny=("fp8_current",)))


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="valid names are: auto, bf16, fp16"):
        PrecisionRequest(recipe="fp9")
    with pytest.raises(ValueError, match="deny: unknown recipe 'int8'"):
        PrecisionRequest(deny=("int8",))
    with pytest.raises(ValueError, match="compute capability must look like"):
        Environment.assume(cc="nine")
    for unknown in ("99.9", (9, 1), 13.0):
        with pytest.raises(ValueError, match=r"is not one of an NVIDIA GPU; known: 5\.0, .*, 12\.1 \(or 'cpu'\)"):
            Environment.assume(cc=unknown)
    with pytest.raises(ValueError, match="not a version number"):
        Environment.assume(cc="9.0", te="two")


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_nothing_left_lists_what_this_machine_runs_not_every_name(cpu_bf16):
    cpu = Environment.assume(cpu_bf16=cpu_bf16)
    with pytest.raises(PlanError) as err:
        make_plan(cpu, PrecisionRequest(allow=("fp8_current",)))
    assert str(err.value) == ("no recipe is allowed here: this machine runs bf16, fp32, and allow=['fp8_current']"
                              " leaves none of them")
    with pytest.raises(PlanError, match=r"recipe 'fp8_block' cannot run here \[cpu-(bf16|fp32)\] and none of its"
                                        r" fallbacks \(fp8_current, bf16, fp32\) is allowed: this machine runs bf16,"
                                        r" fp32, and deny=\['bf16', 'fp32'\] leaves none of them"):
        make_plan(cpu, PrecisionRequest(recipe="fp8_block", deny=("bf16", "fp32"), strict=False))
    hopper = Environment.assume(cc="9.0", te="2.20.2")
    with pytest.raises(PlanError, match=r"this machine runs bf16, fp16, fp32, fp8_delayed, fp8_current, fp8_block,"
                                        r" and allow=\['mxfp8', 'nvfp4'\] leaves none of them"):
        make_plan(hopper, PrecisionRequest(allow=("mxfp8", "nvfp4")))


def test_cpu_with_native_bf16_uses_bf16():
    plan = make_plan(Environment.assume(cpu_bf16=True))
    assert plan.summary() == "bf16" and "cpu-bf16" in {r.rule for r in plan.reasons}


def test_plan_json_round_trip():
    plan = make_plan(Environment.assume(cc="12.1", te="2.20.2"), PrecisionRequest(auto_nvfp4=True))
    import json

    from lightning_te_moe import Plan

    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert again.environment.compute_capability == (12, 1)


def test_rendered_table_names_every_rule():
    plan = make_plan(Environment.assume(cc="12.1", te="2.20.2", cudnn="9.14.0"), PrecisionRequest(auto_nvfp4=True))
    text = plan.render_text(width=200)
    for reason in plan.reasons:
        assert reason.rule in text
    assert "NVTE_FUSED_ATTN=0" in text and "TE #2372" in text


def test_rendered_table_shows_bracketed_text_and_the_experts_row_on_request():
    plan = make_plan(Environment.assume(cc="9.0"))  # a GPU without TE: the no-te rule says how to install it
    text = plan.render_text(width=200)
    assert "pip install 'lightning-te-moe[te]'" in text  # rich markup would have eaten "[te]"
    without = plan.render_text(width=200, experts=False)
    assert re.search(r"│ experts +│", text) and not re.search(r"│ experts +│", without)
    assert re.search(r"│ dense layers +│", without)


def test_policy_doc_is_current():
    from pathlib import Path

    from lightning_te_moe.policy.doc import render_policy_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "policy.md"
    assert doc.read_text() == render_policy_markdown(), (
        "docs/policy.md is stale: run `python -m lightning_te_moe.policy.doc > docs/policy.md`")


def test_middle_rung_backward_override_follows_params_dtype():
    env = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")
    fp32 = make_plan(env)
    assert fp32.ladder[1].dense.backward_override == "dequantized"
    assert "hp-backward-fp32-params" in {r.rule for r in fp32.reasons}
    bf16 = make_plan(env, PrecisionRequest(params_dtype="bfloat16"))
    assert bf16.summary() == "fp8_current -> fp8_current+hp_bwd -> bf16"
    assert bf16.ladder[1].experts.backward_override == "high_precision"
    assert "hp-backward-fp32-params" not in {r.rule for r in bf16.reasons}
