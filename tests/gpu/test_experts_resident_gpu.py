"""Frozen experts under FP8 hold only TE's quantized copies on the GPU; their BF16 values wait on the host."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import fp8_recipes_here, layer_step, rel_err, tiny_model  # noqa: E402

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts, unswap_experts  # noqa: E402
from lightning_te_moe.experts.resident import parked_resident_weights  # noqa: E402
from lightning_te_moe.policy.environment import Environment  # noqa: E402
from lightning_te_moe.policy.plan import Plan, Rung  # noqa: E402
from lightning_te_moe.policy.recipes import RecipeSpec  # noqa: E402
from lightning_te_moe.policy.state import PrecisionState  # noqa: E402

RECIPES = [r for r in fp8_recipes_here() if r != "fp8_delayed"]  # delayed scaling keeps TE's own cache


def _layer() -> torch.nn.Module:
    """A GPT-OSS experts layer big enough for the memory to show: 8 experts, H=I=512 (BF16: 12 MiB)."""
    model = tiny_model("gpt_oss", hidden=512, intermediate=512, experts=8, layers=2)
    return model.model.layers[0].mlp.experts.cuda().to(torch.bfloat16)


def _swapped(ref: torch.nn.Module, recipe: str, resident: bool) -> tuple[torch.nn.Module, GroupedExperts, PrecisionState]:
    ladder = (Rung(RecipeSpec.of("bf16"), RecipeSpec.of(recipe)), Rung(RecipeSpec.of("bf16"), RecipeSpec.of("bf16")))
    state = PrecisionState(Plan(ladder=ladder, environment=Environment()))
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ref)
    swap_experts(holder, ExpertSwapConfig(), state=state)
    experts = holder.experts
    experts.requires_grad_(False)
    for r in experts._resident.values():
        r.enabled = resident
    return holder, experts, state


def _batch(tokens: int = 1024) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    top, index = torch.topk(torch.randn(tokens, 8, device="cuda", generator=gen), 2, dim=-1)
    grad = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, index, torch.softmax(top, -1).to(torch.bfloat16), grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_frozen_weights_live_on_the_gpu_only_quantized(recipe: str) -> None:
    ref = _layer()
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    batch = _batch()

    def resident_bytes(module: GroupedExperts) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - base

    base = torch.cuda.memory_allocated()
    def steps(module: GroupedExperts) -> list[dict[str, torch.Tensor]]:  # results off the GPU: not counted
        return [{k: v.cpu() for k, v in layer_step(module, *batch).items()} for _ in range(2)]

    _, cached, _ = _swapped(ref, recipe, resident=False)  # TE's cache beside the BF16 weights
    want = steps(cached)
    with_cache = resident_bytes(cached)
    del cached, _
    holder, held, state = _swapped(ref, recipe, resident=True)
    got = steps(held)
    held_only = resident_bytes(held)
    bf16_bytes = sum(w.numel() * 2 for w in (held.fc1.weight, held.fc2.weight))
    print(recipe, "GPU bytes kept: TE cache + BF16", with_cache, "quantized only", held_only, "BF16", bf16_bytes)
    assert held.fc1.weight.device.type == "cpu" and held.fc2.weight.device.type == "cpu"
    assert with_cache - held_only >= 0.9 * bf16_bytes  # the BF16 copy left the GPU, nothing took its place
    for a, b in zip(got, want):  # the same quantized weights as TE's own cache: the same numbers
        assert max(rel_err(a[k], b[k]) for k in a) <= 1e-3
    saved = holder.state_dict()  # checkpoints keep the exact BF16 values
    assert all(torch.equal(saved["experts." + k].cpu(), v.cpu()) for k, v in original.items())
    state.set_index(1)  # step down to BF16: the values come back to the GPU
    layer_step(held, *batch)
    assert held.fc1.weight.is_cuda and held.fc2.weight.is_cuda
    state.set_index(0)
    layer_step(held, *batch)
    assert held.fc1.weight.device.type == "cpu"
    assert unswap_experts(holder) == 1  # the original module comes back on the GPU with the exact values
    assert all(v.is_cuda and torch.equal(v, original[k]) for k, v in holder.experts.state_dict().items())


@pytest.mark.parametrize("recipe", RECIPES)
def test_parked_copies_leave_the_gpu_and_come_back_unchanged(recipe: str) -> None:
    """The memory fallback's compaction with TE's real quantized tensors: inside the block the copies' GPU memory is
    free, after it the same bytes are back and the layer computes the same numbers."""
    holder, held, _ = _swapped(_layer(), recipe, resident=True)
    batch = _batch()
    layer_step(held, *batch)  # the first forward quantizes and keeps the copies
    want = {k: v.cpu() for k, v in layer_step(held, *batch).items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with parked_resident_weights(holder) as moved:
        torch.cuda.synchronize()
        inside = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    print(recipe, "moved", moved, "allocated before / inside / after", before, inside, after)
    assert moved > 0
    assert before - inside >= 0.9 * moved  # the GPU copies were freed, not kept beside the host ones
    assert abs(after - before) <= 0.1 * moved  # and came back once
    got = {k: v.cpu() for k, v in layer_step(held, *batch).items()}
    assert max(rel_err(got[k], want[k]) for k in want) <= 1e-3  # the same quantized bytes came back
