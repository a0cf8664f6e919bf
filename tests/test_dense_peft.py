"""PEFT LoRA on swapped dense layers: applied before the swap (the usual order: the swap replaces the LoRA layer's
``base_layer``) or after it (PEFT wraps the TE layer as any ``nn.Linear``). The adapters train, the frozen base is
quantized once (TE stand-in), merging, saving and unswapping work."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import te_standin
import torch
import torch.nn.functional as F
from experts_helpers import tiny_model
from te_standin import Float8CurrentScaling, autocast, fake_fp8

from lightning_te_moe.dense import TEDenseLinear, swap_dense, unswap_dense

peft = pytest.importorskip("peft")


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return logits.detach()


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_lora_applied_first_keeps_training_on_the_te_base_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    te = te_standin.install(monkeypatch)
    ref = _lora(tiny_model("gpt_oss"))
    model = copy.deepcopy(ref)
    report = swap_dense(model)
    layer = model.base_model.model.model.layers[0].self_attn
    assert type(layer.q_proj).__name__ == "Linear" and isinstance(layer.q_proj.base_layer, TEDenseLinear)
    assert isinstance(layer.k_proj, TEDenseLinear) and type(layer.q_proj.lora_A["default"]) is torch.nn.Linear
    assert {e.role for e in report.by_status("kept") if ".lora_" in e.path} == {"adapter"}
    assert model.state_dict().keys() == ref.state_dict().keys()

    opt, opt_ref = (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, ref))
    for seed in range(2):  # off any quantized recipe: exactly PEFT on the unswapped model
        assert torch.equal(_step(model, opt, seed), _step(ref, opt_ref, seed))
    assert all(torch.equal(a, b) for a, b in zip(_adapter_state(model).values(), _adapter_state(ref).values()))

    before = {k: v.clone() for k, v in _adapter_state(model).items()}
    for seed in range(3):
        with autocast(recipe=Float8CurrentScaling()):
            _step(model, opt, seed)
    assert all(not torch.equal(before[k], v) for k, v in _adapter_state(model).items())  # the adapters train
    base = layer.q_proj.base_layer
    engine = id(base._engines["cpu"].module)
    assert [c.first_microbatch for c in te.calls if c.layer == engine] == [True, None, None]  # quantized once, held
    assert base.weight.grad is None and not base.weight.requires_grad

    x = torch.randn(16, 32)
    for change in (model.merge_adapter, model.unmerge_adapter):  # both rewrite the base weight through .data
        before = base.weight.detach().clone()
        change()
        assert not torch.equal(base.weight, before)
        with autocast(recipe=Float8CurrentScaling()):
            assert torch.equal(base(x), F.linear(fake_fp8(x), fake_fp8(base.weight), base.bias))
    assert [c.first_microbatch for c in te.calls if c.layer == engine][3:] == [True, True]  # quantized again
    unswap_dense(model)
    assert "merge" not in layer.q_proj.__dict__ and type(layer.q_proj.base_layer) is torch.nn.Linear


def test_lora_applied_after_the_swap_wraps_the_te_layer_merges_and_saves(tmp_path: Path) -> None:
    plain = _lora(tiny_model("mixtral"))
    swapped = tiny_model("mixtral")
    swap_dense(swapped)
    model = _lora(swapped)
    layer = model.base_model.model.model.layers[1].self_attn
    assert isinstance(layer.v_proj.base_layer, TEDenseLinear) and type(layer.v_proj).__name__ == "Linear"
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert torch.equal(adapted, plain(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "swapped")
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "swapped" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()

    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[1].self_attn.v_proj, TEDenseLinear)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
    assert unswap_dense(merged) == 8 and type(merged.model.layers[1].self_attn.v_proj) is torch.nn.Linear
