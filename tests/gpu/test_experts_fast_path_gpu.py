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
from experts_helpers import (cuda_experts_layer, cuda_topk_routing, fp8_recipes_here, layer_step,  # noqa: E402
                             original_layout_grads, precision_state, rel_err)

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts  # noqa: E402
from lightning_te_moe.experts import module as experts_module  # noqa: E402
from lightning_te_moe.experts import te_routing  # noqa: E402




def _swap(ref: torch.nn.Module, recipe: str, **config: Any) -> tuple[torch.nn.Module, GroupedExperts]:
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(ref)
    assert len(swap_experts(holder, ExpertSwapConfig(**config), state=precision_state(recipe)).swapped) == 1
    return holder, holder.experts





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
@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_fused_path_matches_original(arch: str, recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TE's fused permute/pad/unpermute vs transformers' eager experts: outputs and every gradient."""
    spy = _Spy(monkeypatch)
    ref = cuda_experts_layer(arch)
    holder, swapped = _swap(ref, recipe)
    data = cuda_topk_routing(999)
    want, got = layer_step(ref, *data), layer_step(swapped, *data)
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
    _, fused = _swap(cuda_experts_layer("gpt_oss"), recipe)
    gathers = copy.deepcopy(fused)
    data = cuda_topk_routing(513, seed=1)
    a = layer_step(fused, *data)
    monkeypatch.setattr(experts_module, "fused_permutation_available", lambda: False)
    b = layer_step(gathers, *data)
    a.update({n: p.grad.float() for n, p in fused.named_parameters()})
    b.update({n: p.grad.float() for n, p in gathers.named_parameters()})
    errors = {k: rel_err(a[k], b[k]) for k in a}
    print(recipe, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-2, errors


def test_repeated_expert_in_one_token_takes_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token naming one expert twice: TE's mask holds one row with the summed weight, the same function."""
    spy = _Spy(monkeypatch)
    ref = cuda_experts_layer("mixtral")
    holder, swapped = _swap(ref, "bf16")
    x, index, weights, grad = cuda_topk_routing(64)
    index[0, 1] = index[0, 0]
    want, got = layer_step(ref, x, index, weights, grad), layer_step(swapped, x, index, weights, grad)
    assert spy.calls == 1
    theirs = {**want, **{k: p.grad.float() for k, p in ref.named_parameters()}}
    ours = {**got, **{k.removeprefix("experts."): v.float() for k, v in original_layout_grads(holder).items()}}
    errors = {k: rel_err(ours[k], theirs[k]) for k in theirs}
    assert max(errors.values()) <= 2e-2, errors


def test_routing_without_host_splits_never_syncs() -> None:
    """``host_splits=False`` (TE's native grouped GEMM): routing map, upper-bound permute, weighted unpermute and
    their backwards run with CUDA's sync debug mode set to error, so none of them waits on the device."""
    x, index, weights, grad = cuda_topk_routing(1000)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route = te_routing.fused_routing(index, weights, 8, 16, host_splits=False)
        assert route is not None
        rows = route.permute(x)
        route.combine(rows * 2).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.size(0) == te_routing.upper_bound_rows(1000, 2, 8, 16)
    exact = te_routing.fused_routing(index, weights.detach(), 8, 16)
    assert exact is not None
    assert torch.equal(rows[:exact.rows], exact.permute(x.detach()))
    assert not rows[exact.rows:].any()  # the slack rows are zero
    assert torch.isfinite(x.grad).all() and torch.isfinite(weights.grad).all()


@pytest.mark.parametrize("host_splits", [True, False], ids=["host-splits", "upper-bound"])
def test_padding_rows_are_zero_in_reused_memory(host_splits: bool) -> None:
    """TE's kernels run without ``pad_offsets`` (uninitialised buffers) and only the padding rows are zeroed: with the
    allocator's cache full of NaN, the permuted rows and the gradient reaching the expert rows are still zero on every
    padding row, and the tokens' rows are TE's own (its kernels with ``pad_offsets``, zero-filled buffers)."""
    from transformer_engine.pytorch import moe_unpermute

    x, index, weights, grad = cuda_topk_routing(1000)
    route = te_routing.fused_routing(index, weights, 8, 16, host_splits=host_splits)
    assert route is not None and route.pad_offsets is not None
    poison = torch.full((4 * route.rows, x.size(1)), float("nan"), device="cuda", dtype=x.dtype)
    del poison  # its blocks go back to the allocator's cache, NaN inside
    x_ours = x.detach().clone().requires_grad_(True)
    rows = route.permute(x_ours)
    rows.retain_grad()
    route.combine(rows * 2).backward(grad)
    bounds, counts = route.bounds.tolist(), route.counts.tolist()
    padding = torch.zeros(route.rows, dtype=torch.bool, device="cuda")
    for e in range(8):
        padding[bounds[e] + counts[e]:bounds[e + 1]] = True
    assert padding.any() and not rows[padding].any() and not rows.grad[padding].any()
    theirs, row_id_map, _ = torch.ops.te_moe.permute_mask_map_fwd(x.detach(), route.routing_map, route.rows, None,
                                                                  route.pad_offsets)
    assert torch.equal(rows.detach(), theirs)  # TE's placement, TE's zero padding
    rows_te = theirs.clone().requires_grad_(True)
    out = moe_unpermute(rows_te * 2, row_id_map, merging_probs=route.probs.detach(),
                        restore_shape=(1000, x.size(1)), pad_offsets=route.pad_offsets)
    out.backward(grad)
    assert torch.equal(rows.grad, rows_te.grad) and torch.isfinite(x_ours.grad).all()


@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_native_path_routing_computes_the_same_function(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module as it runs where TE's native grouped GEMM is available: routing without a host sync, engines
    built with ``use_grouped_tensor=True`` and fed device split sizes with the slack in the last expert's block.
    This image's cuBLASLt is too old for the native GEMM, so TE runs its split path on those device splits; the
    layer must compute what the host-split layer computes, outputs and every gradient."""
    _, exact = _swap(cuda_experts_layer("gpt_oss"), recipe)
    free = copy.deepcopy(exact)
    data = cuda_topk_routing(777, seed=2)
    a = layer_step(exact, *data)
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: True)
    b = layer_step(free, *data)
    assert all(engine.native for engine in free._engines.values()) and free._engines
    a.update({n: p.grad.float() for n, p in exact.named_parameters()})
    b.update({n: p.grad.float() for n, p in free.named_parameters()})
    errors = {k: rel_err(a[k], b[k]) for k in a}
    print(recipe, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(torch.isfinite(v).all() for v in b.values())
    # BF16: 1e-2, as the native path adds the down-projection bias after the combine (routed_bias), the split
    # path inside TE's GEMM: another BF16 rounding of the output, the routing-weight and fc2-bias gradients
    # (<= 4e-3, H100, cuBLASLt 13.1, 2026-11-27); the weight and input gradients stay exact. FP8: 3e-2, as the native
    # path adds the up-projection bias in the activation kernel (bias_glu), the split path in TE's GEMM: a BF16
    # rounding moved before an FP8 cast (2^-3 relative steps) flips some casts (<= 2.1e-2, same day).
    assert max(errors.values()) <= (1e-2 if recipe == "bf16" else 3e-2), errors


def _cublaslt() -> str:
    import transformer_engine_torch as tex

    value = int(tex.get_cublasLt_version())
    return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"


def _blocks(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the expert blocks (rows per expert) every TE engine call gets, as TE's GEMM reads them."""
    seen: list[list[int]] = []
    original = experts_module.TEGroupedGemm.__call__

    def call(engine: Any, x: torch.Tensor, weight: Any, splits: Optional[list[int]], *args: Any, **kwargs: Any) -> Any:
        device_splits = args[1] if len(args) > 1 else None
        seen.append(device_splits.tolist() if engine.native else list(splits or []))
        return original(engine, x, weight, splits, *args, **kwargs)

    monkeypatch.setattr(experts_module.TEGroupedGemm, "__call__", call)
    return seen


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen-experts"])
@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_native_grouped_gemm_where_te_takes_it(recipe: str, frozen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipe TE runs on its native grouped GEMM on this stack (TE's own predicate; skipped where TE runs it
    one GEMM per expert): every expert block, the slack block included, is a multiple of the rows the native
    quantizer needs (128 for FP8 block scaling), and the layer matches transformers' eager experts and the same
    layer on TE's split path, outputs and every gradient, all finite. Before the 128-row alignment, FP8 block
    scaling failed here on cuBLASLt 13.10 with TE's "multiple of 128 (VARYING_FIRST_DIM)" assertion and NaN
    gradients."""
    from lightning_te_moe.experts.gemm import native_grouped_gemm
    from lightning_te_moe.policy.recipes import RecipeSpec

    spec = RecipeSpec.of(recipe)
    if not native_grouped_gemm(spec.build(), torch.bfloat16):
        pytest.skip(f"TE runs {recipe} one GEMM per expert on this stack (cuBLASLt {_cublaslt()})")
    ref = cuda_experts_layer("gpt_oss")
    holder, native = _swap(ref, recipe)
    split = copy.deepcopy(native)
    for module in (ref, native, split):
        module.requires_grad_(not frozen)
    data = cuda_topk_routing(999, seed=4)
    blocks = _blocks(monkeypatch)
    want, got = layer_step(ref, *data), layer_step(native, *data)
    assert native._engines and all(engine.native for engine in native._engines.values())
    need = spec.alignment_for("native")
    assert blocks and all(b % need == 0 for call in blocks for b in call), (need, blocks)
    assert sum(blocks[0]) == te_routing.upper_bound_rows(999, 2, 8, need)  # no host sync: the upper bound
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda r, dtype: False)
    other = layer_step(split, *data)
    if not frozen:
        want.update({k: p.grad.float() for k, p in ref.named_parameters()})
        got.update({k.removeprefix("experts."): v.float() for k, v in original_layout_grads(holder).items()})
        other.update({n: p.grad.float() for n, p in split.named_parameters()})
        got_ours = {n: p.grad.float() for n, p in native.named_parameters()}
    vs_hf = {k: rel_err(got[k], want[k]) for k in want}
    vs_split = {k: rel_err(got[k], other[k]) for k in ("out", "x.grad", "weights.grad")}
    if not frozen:
        vs_split.update({n: rel_err(got_ours[n], other[n]) for n in got_ours})
    print(recipe, "frozen" if frozen else "trainable", f"cuBLASLt {_cublaslt()}", "blocks of", need,
          "vs HF", {k: f"{v:.1e}" for k, v in vs_hf.items()}, "vs split", {k: f"{v:.1e}" for k, v in vs_split.items()})
    assert all(torch.isfinite(v).all() for v in got.values())
    assert max(vs_hf.values()) <= (2e-2 if recipe == "bf16" else 0.1), vs_hf
    assert max(vs_split.values()) <= (1e-2 if recipe == "bf16" else 5e-2), vs_split


@pytest.mark.parametrize("case", ["trainable", "frozen-experts", "frozen-weights-trainable-biases"])
@pytest.mark.parametrize("recipe", ["bf16", "fp8_current"])
def test_up_projection_bias_in_the_activation_kernel(recipe: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On TE's native path (forced where this cuBLASLt is too old: TE then runs its split path on the same device
    splits) the fc1 bias is added inside the fused GLU kernel (experts/bias_glu.py) instead of TE's separate bias
    pass: the kernel runs, and the layer computes what it computes with TE adding the bias (or, for frozen weights
    with trainable biases, the torch routing adding it), outputs and every gradient."""
    from lightning_te_moe.experts import bias_glu

    calls: list[int] = []
    original = bias_glu._BiasGLU.apply

    def counted(*args: Any) -> Any:
        calls.append(args[0].size(0))
        return original(*args)

    monkeypatch.setattr(bias_glu._BiasGLU, "apply", counted)
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: True)
    _, fused = _swap(cuda_experts_layer("gpt_oss"), recipe)
    plain = copy.deepcopy(fused)
    for module in (fused, plain):
        if case != "trainable":
            module.fc1.weight.requires_grad_(False)
            module.fc2.weight.requires_grad_(False)
        if case == "frozen-experts":
            module.requires_grad_(False)
    data = cuda_topk_routing(999, seed=5)
    a = layer_step(fused, *data)
    assert calls, "the fused bias + GLU kernel did not run"
    monkeypatch.setattr(experts_module, "fused_bias_glu_runs", lambda *args: False)
    b = layer_step(plain, *data)
    a.update({n: p.grad.float() for n, p in fused.named_parameters() if p.grad is not None})
    b.update({n: p.grad.float() for n, p in plain.named_parameters() if p.grad is not None})
    assert a.keys() == b.keys()
    errors = {k: rel_err(a[k], b[k]) for k in a}
    print(recipe, case, f"cuBLASLt {_cublaslt()}", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(torch.isfinite(v).all() for v in a.values())
    # One BF16 rounding moves (TE rounds the GEMM output after adding the bias, the kernel before), and under FP8
    # that flips some of the next FP8 casts (2^-3 relative steps): <= 2.1e-2 on 13.1, 2026-11-27.
    assert max(errors.values()) <= (1e-2 if recipe == "bf16" else 3e-2), errors


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


@pytest.mark.parametrize("recipe", fp8_recipes_here())
def test_cached_fp8_weight_follows_the_weight_across_optimizer_steps(recipe: str) -> None:
    """Two micro-batches per step, fused AdamW: the cached FP8 weights are the current weights, every step.

    Current and block scaling derive each scale from the tensor itself, so the cached copy must give exactly what
    fresh quantization gives. Delayed scaling quantizes with the scale of the micro-batch that made the copy (the
    next micro-batch's scale has moved on), so there the two agree to FP8 precision, and the step-to-step change
    of the output (a stale copy would hide it) must be far larger than that.
    """
    _, cached = _swap(cuda_experts_layer("gpt_oss"), recipe)
    _, fresh = _swap(cuda_experts_layer("gpt_oss"), recipe, cache_quantized_weights=False)
    batches = [cuda_topk_routing(256, seed=s) for s in range(2)]
    layer_step(cached, *batches[0])  # build the engines
    layer_step(fresh, *batches[0])
    cached.invalidate_quantized_weights()
    flags = _flags(cached)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=5e-2, fused=True) for m in (cached, fresh)]
    tol = 0.1 if recipe == "fp8_delayed" else 1e-3
    outputs, errors = [], []
    for _ in range(3):
        for opt in optimizers:
            opt.zero_grad()
        for batch in batches:  # micro-batches of one optimizer step
            a, b = layer_step(cached, *batch), layer_step(fresh, *batch)
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


class _Block(torch.nn.Module):
    """Trainable layers around frozen experts: a projection into them and a router that weights their outputs.

    The top-k choice is fixed (given), so FP8 noise cannot flip a routing decision: what is compared is the
    gradient that flows back through the frozen experts into the trainable parameters.
    """

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)
        self.router = torch.nn.Linear(64, 8, device="cuda", dtype=torch.bfloat16)
        self.experts = experts

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        weights = torch.softmax(self.router(h).float().gather(1, index), dim=-1)
        return self.experts(h, index, weights.to(h.dtype))


def test_frozen_experts_quantized_once_and_grads_match_bf16() -> None:
    """Fine-tuning with frozen experts under FP8: the experts are quantized once (and, for the recipes whose scales
    come from the weight itself, held on the GPU only in that form); the gradients of the trainable
    parameters around them are the ones the same FP8 layer gives with trainable experts, and match the BF16
    run's to FP8 precision (they pass through the fc1/fc2 forward and dgrad GEMMs in FP8, gradients in E5M2:
    the input gradient of this layer alone measured up to 9e-2 against BF16)."""
    recipes = fp8_recipes_here()
    if not recipes:
        pytest.skip("no FP8 on this GPU")
    ref = cuda_experts_layer("gpt_oss")
    torch.manual_seed(0)
    base = _Block(_swap(ref, "bf16")[1])
    x, index, _, grad = cuda_topk_routing(777, seed=3)

    def block(recipe: str, frozen: bool) -> _Block:
        b = _Block(_swap(ref, recipe)[1])
        b.load_state_dict(base.state_dict())
        b.experts.requires_grad_(not frozen)  # weights and biases: the experts are not fine-tuned
        return b

    def step(b: _Block) -> dict[str, torch.Tensor]:
        b.zero_grad()
        b(x, index).backward(grad)
        return {n: p.grad.float() for n, p in b.named_parameters() if n.split(".")[0] in ("proj", "router")}

    want = step(block("bf16", frozen=True))
    assert set(want) == {"proj.weight", "proj.bias", "router.weight", "router.bias"}
    for recipe in recipes:
        frozen, trainable = block(recipe, frozen=True), block(recipe, frozen=False)
        got, same_fp8 = step(frozen), step(trainable)
        vs_bf16 = {n: rel_err(got[n], want[n]) for n in want}
        vs_trainable = {n: rel_err(got[n], same_fp8[n]) for n in want}
        flags = _flags(frozen.experts)
        optimizer = torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad], lr=1e-3, fused=True)
        for _ in range(3):
            step(frozen)
            optimizer.step()
        print(recipe, "frozen flags", flags, "vs bf16", {n: f"{v:.1e}" for n, v in vs_bf16.items()},
              "vs trainable fp8", {n: f"{v:.1e}" for n, v in vs_trainable.items()})
        assert frozen.experts.fc1.weight.grad is None and frozen.experts.fc2.weight.grad is None
        if recipe == "fp8_delayed":  # TE's weight cache: quantized once (in the first step), reused later
            assert flags == [False, False] * 3, flags
        else:  # held as the only GPU copy (experts/resident.py): TE's cache is not asked at all
            assert flags == [] and frozen.experts.fc1.weight.device.type == "cpu", flags
        assert max(vs_trainable.values()) <= 1e-2, (recipe, vs_trainable)
        assert max(vs_bf16.values()) <= 0.15, (recipe, vs_bf16)


def test_native_grouped_gemm_follows_te_and_cublaslt() -> None:
    """TE's native grouped GEMM is picked exactly where TE's own check allows it (the H100 image's cuBLASLt 13.1
    is below its 13.4 minimum on Hopper: the split path runs, and the engines say so; cuBLASLt 13.10: native)."""
    import transformer_engine_torch as tex

    from lightning_te_moe.experts.gemm import native_grouped_gemm

    hopper = torch.cuda.get_device_capability() == (9, 0)
    print("cuBLASLt", _cublaslt(), "native BF16:", native_grouped_gemm(None, torch.bfloat16))
    if hopper:
        assert native_grouped_gemm(None, torch.bfloat16) is (tex.get_cublasLt_version() >= 130400)
    _, swapped = _swap(cuda_experts_layer("mixtral"), "bf16")
    layer_step(swapped, *cuda_topk_routing(128))
    assert swapped._engines
    assert all(engine.native == native_grouped_gemm(None, torch.bfloat16) for engine in swapped._engines.values())


def test_grouped_weight_on_the_native_path_equals_one_weight_per_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 current scaling on TE's native grouped GEMM binds the stacked expert weight as TE's one grouped weight
    (one grouped quantize for all experts, one weight gradient): the same function as one weight per expert,
    outputs and every gradient, experts without a token included (their weight gradients zero); and through two
    micro-batches and an optimizer step the grouped copy TE caches follows the weight. Skipped where TE runs FP8
    current scaling one GEMM per expert (cuBLASLt < 13.5) or lacks the grouped weight."""
    from lightning_te_moe.experts import gemm
    from lightning_te_moe.policy.recipes import RecipeSpec

    if not gemm.grouped_weight_applies(RecipeSpec.of("fp8_current").build(), torch.bfloat16):
        pytest.skip(f"no grouped weight here (cuBLASLt {_cublaslt()})")
    _, grouped = _swap(cuda_experts_layer("gpt_oss"), "fp8_current")
    per_expert = copy.deepcopy(grouped)
    bound: list[tuple[int, ...]] = []
    original = gemm.grouped_weight
    monkeypatch.setattr(gemm, "grouped_weight", lambda w: bound.append(tuple(w.shape)) or original(w))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=5e-2) for m in (grouped, per_expert)]
    errors: dict[str, float] = {}
    for step in range(2):
        for opt in optimizers:
            opt.zero_grad()
        for micro in range(2):
            data = cuda_topk_routing(999, seed=10 * step + micro)
            a = layer_step(grouped, *data)
            with monkeypatch.context() as m:
                m.setattr(gemm.TEGroupedGemm, "grouped_weight_runs", lambda *_: False)
                b = layer_step(per_expert, *data)
            errors.update({f"{k}@{step}.{micro}": rel_err(a[k], b[k]) for k in a})
        grads = {n: p.grad for n, p in grouped.named_parameters()}
        errors.update({f"{n}@{step}": rel_err(grads[n], q.grad) for n, q in per_expert.named_parameters()})
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert torch.count_nonzero(grads["fc1.weight"][5:]) == 0  # experts 5.. got no token
        for opt in optimizers:
            opt.step()
    print(f"cuBLASLt {_cublaslt()}", "grouped weight vs one per expert", {k: f"{v:.1e}" for k, v in errors.items()})
    shapes = [tuple(grouped.fc1.weight.shape), tuple(grouped.fc2.weight.shape)]
    assert bound == shapes * 4  # fc1 and fc2, every micro-batch, the grouped layer only
    assert max(errors.values()) <= 1e-3, errors
