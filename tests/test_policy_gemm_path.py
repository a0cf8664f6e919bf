"""The policy knows the experts' GEMM path (TE's native grouped GEMM or one GEMM per expert) and picks the experts'
recipe from the measurements of that stack; dense layers keep their own choice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lightning_te_moe import Environment, Plan, PlanError, PrecisionRequest, make_plan
from lightning_te_moe.cli import main
from lightning_te_moe.policy import measurements
from lightning_te_moe.policy.autotune import autotune_plan, candidate_plans
from lightning_te_moe.policy.measurements import MEASUREMENTS, ExpertLayerMeasurement, measured_for
from lightning_te_moe.policy.rules import When


def _h100(cublaslt: str, te: str = "2.20.2") -> Environment:
    return Environment.assume(cc="9.0", te=te, cublaslt=cublaslt)


def _paths(plan: Plan) -> list[tuple[str, str]]:
    return [(r.experts.label(), r.experts_gemm) for r in plan.ladder]


# TE 2.20.2's is_module_grouped_tensor_path_supported, row by row: (CC, cuBLASLt, experts recipe) -> native?
NATIVE = [
    ("9.0", "13.1.0", "bf16", False), ("9.0", "13.3.0", "bf16", False), ("9.0", "13.4.0", "bf16", True),
    ("9.0", "13.4.0", "fp8_current", False), ("9.0", "13.5.0", "fp8_current", True),
    ("9.0", "13.5.0", "fp8_block", False), ("9.0", "13.6.0", "fp8_block", True), ("9.0", "13.10.0", "fp8_block", True),
    ("9.0", "13.10.0", "fp8_delayed", False),
    ("10.0", "13.2.0", "bf16", False), ("10.0", "13.3.0", "bf16", True), ("10.0", "13.3.0", "fp8_current", True),
    ("10.0", "13.3.0", "mxfp8", True), ("10.0", "13.3.0", "nvfp4", True), ("10.0", "13.10.0", "fp8_block", False),
    ("10.3", "13.10.0", "mxfp8", True), ("11.0", "13.10.0", "mxfp8", True),
    ("12.0", "13.10.0", "bf16", False), ("12.1", "13.10.0", "bf16", False),
    ("8.9", "13.10.0", "fp8_current", False), ("8.0", "13.10.0", "bf16", False),
]


@pytest.mark.parametrize(("cc", "cublaslt", "recipe", "native"), NATIVE)
def test_native_grouped_gemm_follows_tes_predicate(cc: str, cublaslt: str, recipe: str, native: bool) -> None:
    """The rules reproduce TE's own predicate: the experts' GEMM path of a requested experts recipe."""
    env = Environment.assume(cc=cc, te="2.20.2", cublaslt=cublaslt)
    plan = make_plan(env, PrecisionRequest(recipe="bf16", experts=recipe, strict=False))
    # off TE's native GEMM, BF16 experts run torch's grouped_mm on Hopper/Blackwell (rule experts-bf16-grouped-mm)
    off_native = "grouped_mm" if recipe == "bf16" and cc in ("9.0", "10.0", "10.3") else "split"
    expected = "native" if native else off_native
    assert plan.experts.name == recipe and plan.ladder[0].experts_gemm == expected
    rules = {r.rule for r in plan.reasons}
    assert ("experts-gemm-split" in rules) is (expected == "split")
    assert ("experts-bf16-grouped-mm" in rules) is (expected == "grouped_mm")


def test_backward_override_and_missing_rht_keep_the_experts_split() -> None:
    """The ladder's high-precision-backward rung leaves TE's native path, and so does NVFP4 without RHT."""
    plan = make_plan(_h100("13.10.0"), PrecisionRequest(recipe="fp8_current"))
    assert _paths(plan) == [("fp8_current", "native"), ("fp8_current+dq_bwd", "split"), ("bf16", "native")]
    assert any(r.rule == "native-grouped-split-settings" and "(backward_override set)" in r.text
               for r in plan.reasons)
    b200 = Environment.assume(cc="10.0", te="2.20.2", cublaslt="13.10.0")
    nvfp4 = make_plan(b200, PrecisionRequest(recipe="nvfp4", experts="nvfp4"))
    assert nvfp4.ladder[0].experts_gemm == "native"
    assert make_plan(b200, PrecisionRequest(recipe="nvfp4", experts="nvfp4")).ladder[0].experts_alignment == 128


def test_native_path_needs_a_te_with_tes_predicate() -> None:
    """TE < 2.19 has no is_module_grouped_tensor_path_supported: the module runs TE's split path whatever the
    cuBLASLt, and the plan says so."""
    plan = make_plan(_h100("13.10.0", te="2.18.0"), PrecisionRequest(recipe="bf16"))
    assert plan.ladder[0].experts_gemm == "grouped_mm"  # BF16 off the native GEMM: torch grouped_mm
    fp8 = make_plan(_h100("13.10.0", te="2.18.0"), PrecisionRequest(recipe="fp8_current"))
    assert fp8.ladder[0].experts_gemm == "split"
    assert "te-no-native-grouped" in {r.rule for r in plan.reasons}
    assert make_plan(_h100("13.10.0", te="2.19.0"), PrecisionRequest(recipe="bf16")).ladder[0].experts_gemm == "native"


def test_no_te_or_cpu_runs_the_torch_path() -> None:
    assert make_plan(Environment.assume()).ladder[0].experts_gemm == "torch"
    assert make_plan(Environment.assume(cc="9.0")).ladder[0].experts_gemm == "torch"  # no TE


def test_plan_table_and_json_show_the_path_per_rung() -> None:
    plan = make_plan(_h100("13.10.0"))
    text = plan.render_text(width=200)
    assert "fp8_current (native grouped GEMM, tokens per expert padded to 16)" in text
    assert ("fp8_current: native grouped GEMM, 16 rows per expert; fp8_current+dq_bwd: one GEMM per expert,"
            " 16 rows per expert; bf16: native grouped GEMM") in text
    data = json.loads(plan.to_json())
    assert data["experts_gemm"] == "native"
    assert [(r["experts_gemm"], r["experts_gemm_text"], r["experts_alignment"]) for r in data["ladder"]] == [
        ("native", "native grouped GEMM", 16), ("split", "one GEMM per expert", 16),
        ("native", "native grouped GEMM", 1)]
    assert Plan.from_dict(data) == plan


def test_fp8_block_on_the_native_path_is_padded_to_128() -> None:
    plan = make_plan(_h100("13.10.0"), PrecisionRequest(recipe="fp8_block"))
    assert _paths(plan)[:2] == [("fp8_block", "native"), ("fp8_block+dq_bwd", "split")]
    assert [r.experts_alignment for r in plan.ladder] == [128, 16, 1]
    alignment = next(r for r in plan.reasons if r.rule == "grouped-gemm-alignment")
    assert "fp8_block experts on native grouped GEMM" in alignment.text and "multiple of 128" in alignment.text


@pytest.mark.parametrize(("cublaslt", "experts", "record"), [
    ("13.1.0", "bf16", "measured-h100-split"),  # every FP8 recipe measured slower than BF16 on the split path
    ("13.4.0", "bf16", "measured-h100-split"),  # only BF16 runs natively there: FP8 still split
    ("13.5.0", "fp8_current", "measured-h100-native"),
    ("13.10.0", "fp8_current", "measured-h100-native"),
])
def test_auto_gives_the_experts_the_fastest_measured_recipe(cublaslt: str, experts: str, record: str) -> None:
    plan = make_plan(_h100(cublaslt), PrecisionRequest(cuda_graphs=False))
    # the dense layers' choice is the rules': in an eager step BF16 below cuBLASLt 13.5 (hopper-split-dense-bf16),
    # else FP8 current; with CUDA graphs (one process's default) FP8 current everywhere, the experts as measured
    assert plan.dense.name == ("bf16" if record == "measured-h100-split" else "fp8_current")
    graphed = make_plan(_h100(cublaslt))
    assert graphed.cuda_graphs and graphed.dense.name == "fp8_current" and graphed.experts.name == experts
    assert plan.experts.name == experts
    why = next(r for r in plan.reasons if r.rule == record)
    assert f"experts: auto chose {experts}, the fastest allowed recipe measured on this stack" in why.text
    assert measured_for(_h100(cublaslt)).id == record
    m = measured_for(_h100(cublaslt))
    assert all(m.trainable_ms[experts] <= ms for ms in m.trainable_ms.values())


def test_auto_never_gives_the_experts_a_recipe_measured_slower_than_an_allowed_one() -> None:
    """On the split path (H100, cuBLASLt 13.1, 2026-11-27) FP8 block (22.2 ms) beats delayed (23.7) and current
    (27.4) but not BF16 (19.6): without BF16 it is block, without block too delayed, and with prefer_stability (no
    delayed) without BF16 and block it is current; the dense layers are unaffected."""
    env = _h100("13.1.0")
    assert make_plan(env, PrecisionRequest(deny=("bf16",))).experts.name == "fp8_block"
    assert make_plan(env, PrecisionRequest(deny=("bf16", "fp8_block"))).experts.name == "fp8_delayed"
    stable = PrecisionRequest(deny=("bf16", "fp8_block"), prefer_stability=True)
    assert make_plan(env, stable).experts.name == "fp8_current"
    plan = make_plan(env, PrecisionRequest(deny=("bf16",)))
    assert plan.dense.name == "fp8_current" and "not allowed here: bf16" in " ".join(r.text for r in plan.reasons)


def test_a_named_recipe_is_not_second_guessed() -> None:
    """recipe='fp8_current' on the split path: the experts run it too (the user asked), and experts= names them."""
    env = _h100("13.1.0")
    assert make_plan(env, PrecisionRequest(recipe="fp8_current")).summary() == (
        "fp8_current -> fp8_current+dq_bwd -> bf16")
    plan = make_plan(env, PrecisionRequest(experts="fp8_block", cuda_graphs=False))  # dense: BF16 (auto's rules)
    assert plan.summary() == "bf16 / experts fp8_block -> bf16 / experts fp8_block+dq_bwd -> bf16"
    assert "request.experts" in {r.rule for r in plan.reasons}
    with pytest.raises(PlanError, match="experts recipe 'mxfp8' cannot run"):
        make_plan(env, PrecisionRequest(experts="mxfp8"))
    assert make_plan(env, PrecisionRequest(experts="mxfp8", strict=False)).experts.name == "fp8_current"
    with pytest.raises(ValueError, match="experts: unknown recipe 'fp9'"):
        PrecisionRequest(experts="fp9")


def test_bf16_dense_with_fp8_experts_still_ends_on_bf16() -> None:
    plan = make_plan(_h100("13.10.0"), PrecisionRequest(recipe="bf16", experts="fp8_current"))
    assert plan.summary() == "bf16 / experts fp8_current -> bf16 / experts fp8_current+dq_bwd -> bf16"


def test_no_measurement_for_the_stack_keeps_the_dense_recipe() -> None:
    """Blackwell and Ada have no measurement yet: the experts follow the dense layers, as before."""
    assert measured_for(Environment.assume(cc="10.0", te="2.20.2", cublaslt="13.10.0")) is None
    assert make_plan(Environment.assume(cc="10.0", te="2.20.2", cublaslt="13.10.0")).experts.name == "mxfp8"
    assert measured_for(_h100("13.1.0", te="2.14.0")) is None  # before TE's fused permute: another code path


def test_the_measurements_table_is_the_one_place_to_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-measured stack changes auto's experts choice with no code change."""
    faster_block = dataclasses.replace(MEASUREMENTS[1], trainable_ms={"bf16": 20.2, "fp8_current": 19.3,
                                                                     "fp8_block": 15.0})
    monkeypatch.setattr(measurements, "MEASUREMENTS", (MEASUREMENTS[0], faster_block))
    assert make_plan(_h100("13.10.0")).experts.name == "fp8_block"
    blackwell = ExpertLayerMeasurement("measured-b200", When(device="cuda", cc_min=10.0, cc_below=11.0), "test",
                                       "2026-12-01", "B200", "2.20.2", "13.10.0", 16384, {"bf16": 9.0, "mxfp8": 11.0})
    monkeypatch.setattr(measurements, "MEASUREMENTS", (blackwell,))
    plan = make_plan(Environment.assume(cc="10.0", te="2.20.2", cublaslt="13.10.0"))
    assert plan.dense.name == "mxfp8" and plan.experts.name == "bf16"


def test_autotune_times_the_experts_recipes_and_keeps_the_dense_choice() -> None:
    env = _h100("13.1.0")
    eager = PrecisionRequest(cuda_graphs=False)
    assert list(candidate_plans(env, eager)) == ["bf16", "fp8_delayed", "fp8_current", "fp8_block"]
    timings = {"bf16": 20.0, "fp8_delayed": 15.0, "fp8_current": 30.0, "fp8_block": 25.0}
    plan, result = autotune_plan(env, eager, lambda p: timings[p.experts.name])
    assert result.rule_choice == "bf16" and result.chosen == "fp8_delayed"
    assert plan.dense.name == "bf16" and plan.experts.name == "fp8_delayed"  # dense: hopper-split-dense-bf16
    assert plan.request["experts"] == "auto" and plan.request["autotune"] is True
    assert all(r.rule != "request.experts" for r in plan.reasons)
    with pytest.raises(ValueError, match="autotune needs recipe='auto' and experts='auto'"):
        autotune_plan(env, PrecisionRequest(experts="bf16"), lambda p: 1.0)


@pytest.mark.parametrize(("cublaslt", "experts", "gemm"), [("13.1.0", "bf16", "grouped_mm"),
                                                           ("13.10.0", "fp8_current", "native")])
def test_cli_assume_cublaslt(capsys: pytest.CaptureFixture[str], cublaslt: str, experts: str, gemm: str) -> None:
    assert main(["plan", "--assume-cc", "9.0", "--assume-te", "2.20.2", "--assume-cublaslt", cublaslt, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["experts"]["name"] == experts and plan["experts_gemm"] == gemm
    assert plan["environment"]["cublaslt_version"] == cublaslt


def test_cli_plans_cuda_graphs_as_the_plugin_would(capsys: pytest.CaptureFixture[str]) -> None:
    """``plan`` takes the plugin's cuda_graphs (auto / on / off) and the run's processes: the default for one process
    on Hopper with TE is graphs and FP8 dense layers on cuBLASLt 13.1; off, or with several processes, the eager rule
    gives BF16."""
    base = ["plan", "--assume-cc", "9.0", "--assume-te", "2.20.2", "--assume-cublaslt", "13.1.0", "--json"]
    outcomes = {}
    for extra in ([], ["--cuda-graphs", "off"], ["--processes", "2"], ["--processes", "2", "--cuda-graphs", "on"]):
        assert main([*base, *extra]) == 0
        plan = json.loads(capsys.readouterr().out)
        outcomes[" ".join(extra)] = (plan["cuda_graphs"], plan["dense"]["name"])
    assert outcomes == {"": (True, "fp8_current"), "--cuda-graphs off": (False, "bf16"),
                        "--processes 2": (False, "bf16"), "--processes 2 --cuda-graphs on": (True, "fp8_current")}
