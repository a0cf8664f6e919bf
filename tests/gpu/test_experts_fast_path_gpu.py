"""The expert layer's fast path on a GPU: TE's fused permutation, and the cached FP8 expert weights."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import original_layout_grads, precision_state, rel_err, tiny_model  # noqa: E402

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts  # noqa: E402
from lightning_te_moe.experts import module as experts_module  # noqa: E402
from lightning_te_moe.experts import te_routing  # noqa: E402


def _fp8_recipes() -> list[str]:
    import transformer_engine.pytorch as te

    names = ["fp8_delayed", "fp8_current"] if te.is_fp8_available() else []
    return names + (["fp8_block"] if te.is_fp8_block_scaling_available() else [])


def _layer(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, hidden=64, intermediate=128, experts=8, layers=2)
    return model.model.layers[0].mlp.experts.cuda().to(torch.bfloat16)


def _swap(ref: torch.nn.Module, recipe: str, **config: Any) -> tuple[torch.nn.Module, GroupedExperts]:
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ref)
    assert len(swap_experts(holder, ExpertSwapConfig(**config), state=precision_state(recipe)).swapped) == 1
    return holder, holder.experts


def _topk_routing(tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Distinct experts per token (a real router's top-k); experts 5..7 get no token."""
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, 8, device="cuda", generator=gen)
    logits[:, 5:] = -torch.inf
    top, index = torch.topk(logits, 2, dim=-1)
    grad = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, index, torch.softmax(top, -1).to(torch.bfloat16), grad


def _step(module: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
          grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = module(x, index, weights)
    out.backward(grad)
    return {"out": out.detach().float(), "x.grad": x.grad.float(), "weights.grad": weights.grad.float()}


class _Spy:
    """Counts the fused-routing combines (the fused path ran) via monkeypatch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = te_routing.FusedRouting.combine

        def combine(route: te_routing.FusedRouting, rows: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return original(route, rows)

        monkeypatch.setattr(te_routing.FusedRouting, "combine", combine)


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
@pytest.mark.parametrize("recipe", ["bf16", *_fp8_recipes()])
def test_fused_path_matches_original(arch: str, recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TE's fused permute/pad/unpermute vs transformers' eager experts: outputs and every gradient."""
    spy = _Spy(monkeypatch)
    ref = _layer(arch)
    holder, swapped = _swap(ref, recipe)
    data = _topk_routing(999)
    want, got = _step(ref, *data), _step(swapped, *data)
    assert spy.calls == 1, "fused routing not taken"
    theirs = {**want, **{k: p.grad.float() for k, p in ref.named_parameters()}}
    ours = {**got, **{k.removeprefix("experts."): v.float() for k, v in original_layout_grads(holder).items()}}
    errors = {k: rel_err(ours[k], theirs[k]) for k in theirs}
    print(arch, recipe, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(torch.isfinite(v).all() for v in ours.values())
    assert max(errors.values()) <= (2e-2 if recipe == "bf16" else 0.1), errors


@pytest.mark.parametrize("recipe", ["bf16", "fp8_current"])
def test_fused_and_torch_routing_agree(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same swapped layer with TE's kernels and with the torch gathers: the same function."""
    _, fused = _swap(_layer("gpt_oss"), recipe)
    gathers = copy.deepcopy(fused)
    data = _topk_routing(513, seed=1)
    a = _step(fused, *data)
    monkeypatch.setattr(experts_module, "fused_permutation_available", lambda: False)
    b = _step(gathers, *data)
    a.update({n: p.grad.float() for n, p in fused.named_parameters()})
    b.update({n: p.grad.float() for n, p in gathers.named_parameters()})
    errors = {k: rel_err(a[k], b[k]) for k in a}
    print(recipe, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-2, errors


def test_repeated_expert_in_one_token_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    ref = _layer("mixtral")
    _, swapped = _swap(ref, "bf16")
    x, index, weights, grad = _topk_routing(64)
    index[0, 1] = index[0, 0]  # TE's mask map cannot hold this
    want, got = _step(ref, x, index, weights, grad), _step(swapped, x, index, weights, grad)
    assert spy.calls == 0
    assert rel_err(got["out"], want["out"]) <= 2e-2


def _flags(module: GroupedExperts) -> list[Optional[bool]]:
    """Record every ``is_first_microbatch`` the module's engines hand to TE."""
    seen: list[Optional[bool]] = []
    for engine in module._engines.values():
        original = engine.weight_cache.first_microbatch

        def spy(weight: torch.Tensor, recipe: Any, _f: Any = original) -> Optional[bool]:
            seen.append(_f(weight, recipe))
            return seen[-1]

        engine.weight_cache.first_microbatch = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("recipe", _fp8_recipes())
def test_cached_fp8_weight_follows_the_weight_across_optimizer_steps(recipe: str) -> None:
    """Two micro-batches per step, fused AdamW: the cached FP8 weights are the current weights, every step.

    Current and block scaling derive each scale from the tensor itself, so the cached copy must give exactly what
    fresh quantization gives. Delayed scaling quantizes with the scale of the micro-batch that made the copy (the
    next micro-batch's scale has moved on), so there the two agree to FP8 precision, and the step-to-step change
    of the output (a stale copy would hide it) must be far larger than that.
    """
    _, cached = _swap(_layer("gpt_oss"), recipe)
    _, fresh = _swap(_layer("gpt_oss"), recipe, cache_quantized_weights=False)
    batches = [_topk_routing(256, seed=s) for s in range(2)]
    _step(cached, *batches[0])  # build the engines
    _step(fresh, *batches[0])
    cached.invalidate_quantized_weights()
    flags = _flags(cached)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=5e-2, fused=True) for m in (cached, fresh)]
    tol = 0.1 if recipe == "fp8_delayed" else 1e-3
    outputs, errors = [], []
    for _ in range(3):
        for opt in optimizers:
            opt.zero_grad()
        for batch in batches:  # micro-batches of one optimizer step
            a, b = _step(cached, *batch), _step(fresh, *batch)
            errors.append(max(rel_err(a[k], b[k]) for k in a))
            outputs.append(a["out"])
        for (name, p), (_, q) in zip(cached.named_parameters(), fresh.named_parameters()):
            errors.append(rel_err(p.grad, q.grad))
        for opt in optimizers:
            opt.step()
    moved = min(rel_err(outputs[i + 2], outputs[i]) for i in (0, 1, 2, 3))
    print(recipe, "flags", flags, "worst cached-vs-fresh", f"{max(errors):.1e}", "step-to-step", f"{moved:.1e}")
    assert flags == [True, True, False, False] * 3  # fc1, fc2: quantize on micro-batch 1, reuse on 2
    assert max(errors) <= tol, errors
    assert moved >= 0.3 and moved >= 3 * max(errors)  # the weights moved, and the cached copy moved with them


def test_frozen_experts_quantized_once_and_grads_match_bf16() -> None:
    """Fine-tuning with frozen experts under FP8: the experts are quantized once, and the gradient of the
    trainable (non-expert) parameters matches the BF16 run's."""
    recipes = _fp8_recipes()
    if not recipes:
        pytest.skip("no FP8 on this GPU")
    recipe = "fp8_current" if "fp8_current" in recipes else recipes[0]
    models = {}
    for name in ("bf16", recipe):
        model = tiny_model("gpt_oss", hidden=128, intermediate=256, experts=8, layers=2).cuda()
        swap_experts(model, state=precision_state(name))
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.requires_grad_(False)  # weights and biases: the experts are not fine-tuned
        models[name] = model
    ids = torch.randint(0, 64, (8, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits.float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    want = step(models["bf16"])
    got = step(models[recipe])
    experts = [m for m in models[recipe].modules() if isinstance(m, GroupedExperts)]
    assert experts and all(m._engines for m in experts), "TE path not taken"
    flags = [_flags(m) for m in experts]
    optimizer = torch.optim.AdamW([p for p in models[recipe].parameters() if p.requires_grad], lr=1e-3, fused=True)
    for _ in range(3):
        step(models[recipe])
        optimizer.step()
    assert all(f == [False, False] * 3 for f in flags), flags  # quantized once, on the first step above

    assert set(got) == set(want) and not any(".fc1." in n or ".fc2." in n for n in got)
    flat_got, flat_want = torch.cat([got[n].flatten() for n in want]), torch.cat([want[n].flatten() for n in want])
    cosine = torch.nn.functional.cosine_similarity(flat_got, flat_want, dim=0).item()
    errors = {n: rel_err(got[n], want[n]) for n in want}
    print(recipe, f"whole gradient rel err {rel_err(flat_got, flat_want):.2e} cosine {cosine:.4f}",
          "worst params", {n: f"{v:.1e}" for n, v in sorted(errors.items(), key=lambda kv: -kv[1])[:4]})
    assert rel_err(flat_got, flat_want) <= 0.15 and cosine >= 0.98
