"""Reversibility: original-layout state dicts, export/load both ways, unswap, save_pretrained."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from experts_helpers import ARCHS, rel_err, tiny_model

from lightning_te_moe.experts import GroupedExperts, swap_experts, unswap_experts


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_train_export_load_into_unswapped(arch: str) -> None:
    swapped = tiny_model(arch)
    original_keys = swapped.state_dict().keys()
    swap_experts(swapped)
    assert swapped.state_dict().keys() == original_keys  # the hook writes the original layout
    _train(swapped)
    fresh = tiny_model(arch, seed=1)
    fresh.load_state_dict(swapped.state_dict(), strict=True)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel_err(fresh(input_ids=ids).logits, swapped(input_ids=ids).logits) <= 1e-6
    # ... and into a freshly swapped model, either layout.
    again = tiny_model(arch, seed=2)
    swap_experts(again)
    again.load_state_dict(swapped.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, swapped(input_ids=ids).logits)


def test_native_layout_loads_too_and_export_helper_matches_state_dict() -> None:
    model = tiny_model("gpt_oss")
    swap_experts(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, GroupedExperts)
    exported = experts.original_state_dict()
    prefix = "model.layers.0.mlp.experts."
    assert all(torch.equal(v, model.state_dict()[prefix + k]) for k, v in exported.items())
    other = copy.deepcopy(experts)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    native = {"fc1.weight": experts.fc1.weight.detach(), "fc1.bias": experts.fc1.bias.detach(),
              "fc2.weight": experts.fc2.weight.detach(), "fc2.bias": experts.fc2.bias.detach()}
    other.load_state_dict(native, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), experts.parameters()))


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_unswap_restores_types_weights_and_frozen_flags(arch: str) -> None:
    ref = tiny_model(arch)
    model = copy.deepcopy(ref)
    kinds = {n: type(m) for n, m in ref.named_modules()}
    first = next(m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter))
    first.down_proj.requires_grad_(False)
    first.gate_up_proj.requires_grad_(False)
    report = swap_experts(model)
    assert unswap_experts(model) == len(report.swapped) > 0
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    restored = next(m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter))
    assert not restored.down_proj.requires_grad and not restored.gate_up_proj.requires_grad
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_save_pretrained_of_a_swapped_model_loads_into_the_original_class(tmp_path: Path) -> None:
    import transformers

    model = tiny_model("gpt_oss")
    swap_experts(model)
    _train(model, steps=1)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(loaded.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6
