"""The dense swap without TE: which layers go to TE and why the others stay, the original state dict, reversibility,
save_pretrained, and the plugin's no-op (with its reason) on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from experts_helpers import ARCHS, precision_state, rel_err, tiny_model
from torch import nn

from lightning_te_moe import TEMoEPrecision, make_plan
from lightning_te_moe.dense import (HIGH_PRECISION_RULE, DenseSwapConfig, TEDenseLinear, plan_dim_multiple, plan_reason,
                                   swap_dense, swap_for_plugin, unswap_dense)
from lightning_te_moe.policy import Environment, PrecisionRequest
from lightning_te_moe.policy.rules import RULES


def _train(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _entries(report, status: str) -> dict[str, str]:
    return {e.path: e.role for e in report.by_status(status)}


def test_attention_projections_go_to_te_and_head_router_embeddings_stay_by_rule() -> None:
    model = tiny_model("gpt_oss")
    report = swap_dense(model)
    swapped = _entries(report, "swapped")
    assert swapped == {f"model.layers.{i}.self_attn.{p}_proj": "attention" for i in range(2) for p in "qkvo"}
    kept = {e.path: e for e in report.by_status("kept")}
    assert {p: e.role for p, e in kept.items()} == {"model.embed_tokens": "embedding", "lm_head": "output head",
                                                     "model.layers.0.mlp.router": "router",
                                                     "model.layers.1.mlp.router": "router"}
    assert all(e.rule == HIGH_PRECISION_RULE and "stays in the compute dtype" in e.reason for e in kept.values())
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].self_attn.q_proj) is TEDenseLinear
    assert "swapped 8 dense linear layer(s) of GptOssForCausalLM to TE (attention 8)" in report.summary()
    text = report.render_text()
    assert "swapped: attention x8 (k_proj, o_proj, q_proj, v_proj; e.g. model.layers.0.self_attn.q_proj)" in text
    assert "kept: output head x1 (lm_head; e.g. lm_head): its logits feed the loss directly" in text


def test_rule_is_in_the_table_and_in_the_plan_of_an_fp8_machine() -> None:
    rule = next(r for r in RULES if r.id == HIGH_PRECISION_RULE)
    assert "output head" in rule.why and "router" in rule.why and "embedding" in rule.why
    plan = make_plan(Environment.assume(cc="9.0", te="2.20.2"))
    assert HIGH_PRECISION_RULE in {r.rule for r in plan.reasons}
    assert HIGH_PRECISION_RULE not in {r.rule for r in make_plan(Environment()).reasons}  # CPU: nothing on TE


def test_deepseek_shared_experts_dense_mlp_and_shapes_te_cannot_run() -> None:
    model = tiny_model("deepseek_v3")  # hidden 32, intermediate 48, MLA kv_a_proj_with_mqa out 24
    report = swap_dense(model)
    swapped = _entries(report, "swapped")
    assert swapped["model.layers.0.mlp.gate_proj"] == "MLP"  # first_k_dense_replace: a dense MLP layer
    assert swapped["model.layers.1.mlp.shared_experts.down_proj"] == "shared expert"
    assert swapped["model.layers.0.self_attn.kv_b_proj"] == "attention"
    shape = {e.path: e.reason for e in report.by_status("kept") if e.role == "attention"}
    assert shape == {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa": "out_features 24 not a multiple of 16 (TE's"
                     " quantized GEMMs need it): stays nn.Linear in the compute dtype" for i in range(2)}
    assert _entries(report, "kept")["model.layers.1.mlp.gate"] == "router"  # DeepseekV3TopkRouter, not a Linear


def test_the_plans_strictest_quantized_recipe_sets_the_dimension_multiple() -> None:
    hopper = make_plan(Environment.assume(cc="9.0", te="2.20.2"))
    blackwell = make_plan(Environment.assume(cc="10.0", te="2.20.2"))
    assert plan_dim_multiple(hopper) == 16 and blackwell.dense.name == "mxfp8" and plan_dim_multiple(blackwell) == 32
    model = tiny_model("mixtral", hidden=48)  # q/o 48x48, k/v 24x48: 48 is a multiple of 16, not of 32
    assert len(swap_dense(copy.deepcopy(model), plan=hopper).swapped) == 4  # q and o of both layers
    report = swap_dense(model, plan=blackwell)
    shapes = {e.reason.split(" not")[0] for e in report.by_status("kept") if e.role == "attention"}
    assert not report.swapped and shapes == {"in_features 48 and out_features 48", "in_features 48 and out_features 24"}


def test_module_filter_subclasses_and_instance_forwards_stay() -> None:
    class MyLinear(nn.Linear):
        pass

    model = tiny_model("qwen3_moe")
    attention = model.model.layers[0].self_attn
    attention.k_proj = MyLinear(32, 16)
    attention.v_proj.forward = attention.v_proj.forward  # a hook library's instance-level wrapper
    report = swap_dense(model, DenseSwapConfig(module_filter=lambda mod, fqn: "layers.1." not in fqn))
    reasons = {e.path: e.reason for e in report.by_status("kept")}
    assert reasons["model.layers.0.self_attn.k_proj"] == "a subclass of nn.Linear (MyLinear) with its own forward"
    assert reasons["model.layers.0.self_attn.v_proj"].startswith("its forward is replaced on the instance")
    assert reasons["model.layers.1.self_attn.q_proj"] == "module_filter returned False"
    assert set(_entries(report, "swapped")) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"}


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_layers_hold_the_same_parameters_and_compute_the_same_function_off_te(arch: str) -> None:
    ref = tiny_model(arch)
    model = copy.deepcopy(ref)
    params = {n: p for n, p in model.named_parameters()}
    swap_dense(model)
    assert {n: p for n, p in model.named_parameters()} == params  # the very same parameter objects, same names
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(out, expected)  # on CPU (no TE) the swapped layers run F.linear
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keeps_the_original_layout_and_loads_strictly_into_the_unswapped_model(arch: str) -> None:
    swapped = tiny_model(arch)
    original = swapped.state_dict()
    swap_dense(swapped)
    state = swapped.state_dict()
    assert state.keys() == original.keys() and not any("_extra_state" in k for k in state)
    _train(swapped)
    fresh = tiny_model(arch, seed=1)
    fresh.load_state_dict(swapped.state_dict(), strict=True)
    again = tiny_model(arch, seed=2)
    swap_dense(again)
    again.load_state_dict(fresh.state_dict(), strict=True)  # and back into a swapped model
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, swapped(input_ids=ids).logits)
        assert torch.equal(again(input_ids=ids).logits, swapped(input_ids=ids).logits)


def test_unswap_restores_types_trained_weights_and_frozen_flags() -> None:
    model = tiny_model("deepseek_v3")
    kinds = {n: type(m) for n, m in model.named_modules()}
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    report = swap_dense(model)
    _train(model)
    trained = copy.deepcopy(model.state_dict())
    assert unswap_dense(model) == len(report.swapped) > 0
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.values()))
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert unswap_dense(model) == 0


def test_swapping_again_changes_nothing() -> None:
    model = tiny_model("gpt_oss")
    swap_dense(model)
    again = swap_dense(model, DenseSwapConfig(cache_quantized_weights=False))
    assert not again.swapped and len(again.by_status("already swapped")) == 8
    assert again.summary() == "8 dense layer(s) of GptOssForCausalLM already on TE: nothing changed"
    assert not model.model.layers[0].self_attn.q_proj.cache_quantized_weights


def test_save_pretrained_of_a_swapped_model_loads_into_the_original_class(tmp_path: Path) -> None:
    import transformers

    model = tiny_model("mixtral")
    swap_dense(model)
    _train(model, steps=1)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6


@pytest.mark.parametrize(("env", "expected"), [
    (Environment(), "device is cpu: dense layers run in torch (TE needs a GPU)"),
    (Environment.assume(cc="9.0"), "Transformer Engine is not installed: dense layers stay torch nn.Linear"),
    (Environment.assume(cc="8.0", te="2.20.2"), "no rung of the plan (bf16) runs a quantized dense recipe"),
])
def test_plans_that_keep_dense_layers_on_torch_say_why(env: Environment, expected: str) -> None:
    assert plan_reason(make_plan(env)).startswith(expected)


def test_cpu_plan_is_a_noop_with_its_reason_printed_and_no_decision(capsys: pytest.CaptureFixture) -> None:
    model = tiny_model("gpt_oss")
    state = precision_state("bf16")
    assert swap_for_plugin(model, state) is None
    assert "dense layers of GptOssForCausalLM not swapped: device is cpu" in capsys.readouterr().out
    assert not any(isinstance(m, TEDenseLinear) for m in model.modules())


def test_a_cuda_plan_without_importable_te_records_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_te_moe.dense.swap as swap_mod
    from lightning_te_moe.policy.state import PrecisionState

    monkeypatch.setattr(swap_mod, "te_available", lambda: False)
    state = PrecisionState(make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0"), PrecisionRequest()))
    summary, details = swap_for_plugin(tiny_model("gpt_oss"), state)
    assert summary.endswith("Transformer Engine does not import in this process: dense layers stay torch nn.Linear")
    assert details["entries"] == []


def test_plugin_runs_the_dense_swap_unless_told_not_to() -> None:
    from lightning_te_moe.dense import swap_for_plugin as dense_swap

    def names(plugin: TEMoEPrecision) -> list[str]:
        return [getattr(s, "func", s).__module__ for s in plugin.module_swaps]

    assert dense_swap.__module__ in names(TEMoEPrecision(print_plan=False))
    assert dense_swap.__module__ not in names(TEMoEPrecision(print_plan=False, swap_dense=False))
