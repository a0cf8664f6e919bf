"""The swap report, models without MoE layers, filters, FP8-incompatible shapes and frozen experts."""

from __future__ import annotations

import copy

import torch
from experts_helpers import original_layout_grads, precision_state, rel_err, tiny_model

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts, swap_for_plugin


def test_report_lists_what_was_swapped_and_what_was_left(capsys: object) -> None:
    model = tiny_model("deepseek_v3", layers=3)
    summary, details = swap_for_plugin(model, precision_state("fp8_current"))
    printed = capsys.readouterr().out  # type: ignore[attr-defined]
    assert summary.startswith("swapped 2 expert layer(s) of DeepseekV3ForCausalLM (DeepseekV3Experts)")
    assert summary in printed and "model.layers.1.mlp.shared_experts (DeepseekV3MLP): kept dense" in printed
    entries = {e["path"]: e for e in details["entries"]}
    swapped = entries["model.layers.2.mlp.experts"]
    assert (swapped["status"], swapped["experts"], swapped["hidden_size"], swapped["intermediate_size"]) == (
        "swapped", 8, 32, 48)
    assert swapped["activation"] == "glu(SiLUActivation)" and swapped["fp8"] and swapped["adapter"] == "transformers-5"
    assert entries["model.layers.2.mlp.shared_experts"]["status"] == "kept dense"
    assert "model.layers.0.mlp" not in entries  # first_k_dense_replace: a dense layer, not an MoE one


def test_gpt_oss_report_names_its_clamped_swiglu() -> None:
    report = swap_experts(tiny_model("gpt_oss"))
    assert {e.activation for e in report.swapped} == {"clamped_swiglu(alpha=1.702, limit=7.0)"}
    assert all(e.bias for e in report.swapped)


def test_model_without_moe_layers_is_left_untouched(capsys: object) -> None:
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    assert swap_for_plugin(model, precision_state("bf16")) is None  # no decision to record ...
    assert capsys.readouterr().out.strip() == (  # type: ignore[attr-defined]
        "[lightning-te-moe] expert swap: no MoE expert layers swapped in LlamaForCausalLM: nothing changed")
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_module_filter_and_swapping_twice() -> None:
    model = tiny_model("mixtral")
    report = swap_experts(model, module_filter=lambda module, name: not name.startswith("model.layers.0."))
    assert [(e.path, e.status) for e in report.entries] == [("model.layers.0.mlp.experts", "filtered out"),
                                                            ("model.layers.1.mlp.experts", "swapped")]
    state = precision_state("bf16")
    again = swap_experts(model, ExpertSwapConfig(module_filter=lambda m, n: False), state=state)
    assert [(e.path, e.status) for e in again.entries] == [("model.layers.0.mlp.experts", "filtered out"),
                                                           ("model.layers.1.mlp.experts", "already swapped")]
    assert model.model.layers[1].mlp.experts.state is state
    assert again.summary() == "1 expert layer(s) of MixtralForCausalLM already swapped: nothing changed"
    assert swap_for_plugin(model, state) is None  # a second setup of the same run records no new decision


def test_fp8_incompatible_shapes_stay_bf16_with_a_reason() -> None:
    ref = tiny_model("gpt_oss", hidden=40, intermediate=48)
    model = copy.deepcopy(ref)
    report = swap_experts(model, ExpertSwapConfig(backend="torch"), state=precision_state("fp8_current"))
    assert report.swapped and all(not e.fp8 for e in report.swapped)
    assert report.swapped[0].reason == "hidden size 40 not a multiple of 16 (TE FP8 GEMMs need it): stays BF16"
    assert "kept out of FP8 (hidden size 40" in report.summary()
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts) and experts._alignment(None, native=False) == 1
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5


def test_frozen_expert_weights_with_trainable_biases() -> None:
    ref = tiny_model("gpt_oss")
    for module in ref.modules():
        if type(module).__name__ == "GptOssExperts":
            module.gate_up_proj.requires_grad_(False)
            module.down_proj.requires_grad_(False)
    model = copy.deepcopy(ref)
    swap_experts(model)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert all(not m.fc1.weight.requires_grad and m.fc1.bias.requires_grad for m in experts)
    ids = torch.randint(0, 64, (2, 9))
    for m in (ref, model):
        m(input_ids=ids).logits.square().mean().backward()
    assert all(m.fc1.weight.grad is None and m.fc2.weight.grad is None for m in experts)
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ours = original_layout_grads(model)
    bias_grads = [n for n in theirs if "experts" in n]
    assert len(bias_grads) == 4 and all(n.endswith("_bias") for n in bias_grads)
    for name, grad in theirs.items():
        assert rel_err(ours[name], grad) <= 1e-5, name


def test_root_experts_module_cannot_be_replaced_in_place() -> None:
    layer = tiny_model("mixtral").model.layers[0].mlp.experts
    report = swap_experts(layer)
    assert [(e.status, e.reason) for e in report.entries] == [
        ("not swappable", "the root module cannot be replaced in place")]
    assert not layer.gate_up_proj.is_meta  # left whole: its weights were not released


def test_plugin_passes_the_weight_cache_setting_to_every_swapped_module() -> None:
    from lightning_te_moe import TEMoEPrecision

    for cache in (True, False):
        model = tiny_model("qwen3_moe")
        TEMoEPrecision(print_plan=False, guard=False, cache_quantized_weights=cache).convert_module(model)
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        assert len(experts) == 2 and all(m.cache_quantized_weights is cache for m in experts)
