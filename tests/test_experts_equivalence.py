"""The swapped experts compute the same function as the originals: logits and every gradient (CPU, fp32)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from experts_helpers import ARCHS, original_layout_grads, precision_state, rel_err, tiny_model, twins

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts
from lightning_te_moe.experts import module as experts_module


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    (logits.square().mean() + logits[..., 0].sum()).backward()
    return logits.detach()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 9)], ids=["single-token", "empty-experts", "odd-T"])
def test_logits_and_every_gradient_match(arch: str, shape: tuple[int, int]) -> None:
    ref, swapped = twins(arch)
    report = swap_experts(swapped)
    assert report.swapped and all(not isinstance(m, type(None)) for m in report.swapped)
    ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(sum(shape)))
    want, got = _loss_and_grads(ref, ids), _loss_and_grads(swapped, ids)
    assert rel_err(got, want) <= 1e-5
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ours = original_layout_grads(swapped)
    assert set(ours) == set(theirs)
    worst = max((rel_err(ours[n], g), n) for n, g in theirs.items())
    assert worst[0] <= 1e-5, worst


def _gpt_oss_layer() -> torch.nn.Module:
    return tiny_model("gpt_oss").model.layers[0].mlp.experts


def _swapped(layer: torch.nn.Module, **kwargs: object) -> GroupedExperts:
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(layer)
    swap_experts(holder, ExpertSwapConfig(backend="torch"), **kwargs)
    assert isinstance(holder.experts, GroupedExperts)
    return holder.experts


@pytest.mark.parametrize("routing", ["all-on-one-expert", "sentinel-slots", "random"])
@pytest.mark.parametrize("align", ["bf16", "fp8_current", "mxfp8", "nvfp4"])
def test_layer_routing_edge_cases_and_padding(routing: str, align: str) -> None:
    """Padding to 1/16/32/128 rows per expert changes nothing; EP sentinel slots are dropped like HF does."""
    layer = _gpt_oss_layer()
    ours = _swapped(layer, state=precision_state(align))
    gen = torch.Generator().manual_seed(3)
    tokens = 13
    x = torch.randn(tokens, 32, generator=gen)
    if routing == "all-on-one-expert":
        index = torch.full((tokens, 2), 5)
    elif routing == "sentinel-slots":
        index = torch.randint(0, 8, (tokens, 2), generator=gen)
        index[::3, 1] = 8  # transformers' expert-parallel sentinel (== num_experts): contributes nothing
        layer = copy.deepcopy(layer)  # eager's one_hot rejects sentinels; transformers' grouped_mm drops them
        layer.config = copy.deepcopy(layer.config)
        layer.config._experts_implementation = "grouped_mm"
        layer._is_expert_parallel = True  # transformers 5.24 drops sentinels only where its expert parallelism is on
    else:
        index = torch.randint(0, 8, (tokens, 2), generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    results = []
    for module in (layer, ours):
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = module(xi, index, wi)
        (out.square().sum()).backward()
        results.append((out.detach(), xi.grad, wi.grad))
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) <= 1e-5


def test_alignment_follows_the_active_recipe() -> None:
    """A step-down between forwards changes the per-expert padding from the next call on."""
    from lightning_te_moe.policy.environment import Environment
    from lightning_te_moe.policy.plan import Plan, Rung
    from lightning_te_moe.policy.recipes import RecipeSpec
    from lightning_te_moe.policy.state import PrecisionState

    ladder = (Rung(RecipeSpec.of("bf16"), RecipeSpec.of("nvfp4")), Rung(RecipeSpec.of("bf16"), RecipeSpec.of("mxfp8")),
              Rung(RecipeSpec.of("bf16"), RecipeSpec.of("bf16")))
    state = PrecisionState(Plan(ladder=ladder, environment=Environment()))
    ours = _swapped(_gpt_oss_layer(), state=state)
    seen: list[list[int]] = []
    real = experts_module.make_dispatch

    def spy(*args: object, **kwargs: object) -> object:
        dispatch = real(*args, **kwargs)
        seen.append(dispatch.splits)
        return dispatch

    x, index, weights = torch.randn(5, 32), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    with mock.patch.object(experts_module, "make_dispatch", spy):
        outs = []
        for _ in range(3):
            outs.append(ours(x, index, weights))
            state.step_down()
    assert all(s % 128 == 0 for s in seen[0]) and max(seen[0]) == 128
    assert all(s % 32 == 0 for s in seen[1]) and max(seen[1]) == 32
    assert sum(seen[2]) == 10
    assert rel_err(outs[0], outs[2]) <= 1e-6 and rel_err(outs[1], outs[2]) <= 1e-6, (rel_err(outs[0], outs[2]), rel_err(outs[1], outs[2]))
