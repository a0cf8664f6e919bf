"""Expert swap on a GPU with Transformer Engine: BF16 and every FP8 recipe the device runs vs the original."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import (cuda_experts_layer, fp8_recipes_here, gpu_fit, layer_step, original_layout_grads,  # noqa: E402
                             precision_state, rel_err, tiny_model)

from lightning_te_moe.experts import GroupedExperts, swap_experts  # noqa: E402



def _run(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten()).backward()
    return logits.detach().float()




@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_swapped_layer_matches_original(arch: str, recipe: str) -> None:
    """Same routing for both (random, 3 of 8 experts left empty, T odd): outputs and every gradient."""
    ref = cuda_experts_layer(arch)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ref)
    report = swap_experts(holder, state=precision_state(recipe))
    assert len(report.swapped) == 1
    swapped = holder.experts
    gen = torch.Generator("cuda").manual_seed(0)
    tokens = 999
    x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = torch.randint(0, 5, (tokens, 2), device="cuda", generator=gen)  # experts 5..7 get no token
    weights = torch.softmax(torch.randn(tokens, 2, device="cuda", generator=gen), -1).to(torch.bfloat16)
    grad = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = layer_step(ref, x, index, weights, grad)
    got = layer_step(swapped, x, index, weights, grad)
    assert swapped._engines, "TE path not taken"
    tol = 2e-2 if recipe == "bf16" else 0.1
    theirs = {**want, **{k: p.grad.float() for k, p in ref.named_parameters()}}
    ours = {**got, **{k: v.float() for k, v in original_layout_grads(holder).items()}}
    ours = {k.removeprefix("experts."): v for k, v in ours.items()}
    assert set(ours) == set(theirs)
    errors = {k: rel_err(ours[k], theirs[k]) for k in theirs}
    print(arch, recipe, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(torch.isfinite(v).all() for v in ours.values())
    assert max(errors.values()) <= tol, errors


def test_frozen_experts_keep_bias_grads_on_te() -> None:
    """Frozen expert weights: no weight gradients, and the trainable biases still get theirs (TE would drop them)."""
    ref = cuda_experts_layer("gpt_oss")
    ref.gate_up_proj.requires_grad_(False)
    ref.down_proj.requires_grad_(False)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ref)
    swap_experts(holder, state=precision_state("bf16"))
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = torch.randint(0, 8, (300, 2), device="cuda", generator=gen)
    weights = torch.rand(300, 2, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    layer_step(ref, x, index, weights, grad)
    layer_step(holder.experts, x, index, weights, grad)
    assert holder.experts._engines, "TE path not taken"
    assert holder.experts.fc1.weight.grad is None and holder.experts.fc2.weight.grad is None
    ours = original_layout_grads(holder)
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        theirs = getattr(ref, name).grad
        assert theirs is not None and ours[f"experts.{name}"].abs().sum() > 0, name
        assert rel_err(ours[f"experts.{name}"], theirs) <= 2e-2, (name, rel_err(ours[f"experts.{name}"], theirs))


def test_short_fit_with_plugin_loss_falls(tmp_path: Path) -> None:
    plugin, module = gpu_fit(tiny_model("gpt_oss", hidden=64, intermediate=128), tmp_path)
    print("plan:", plugin.plan.summary(), "losses:", [round(v, 3) for v in module.losses[::5]])
    assert sum(isinstance(m, GroupedExperts) for m in module.modules()) == 2
    assert all(math.isfinite(v) for v in module.losses)
    assert sum(module.losses[-5:]) / 5 < 0.7 * sum(module.losses[:5]) / 5
