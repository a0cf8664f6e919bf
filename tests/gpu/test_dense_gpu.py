"""Dense layers on TE on a GPU: the swapped model vs the unconverted one in BF16 and every FP8 recipe the device
runs, the original state dict after FP8 steps, the ladder reaching the dense recipe, and activation checkpointing
recomputing under each recipe."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import fp8_recipes_here, gpu_fit, rel_err, tiny_config  # noqa: E402

from lightning_te_moe import TEMoEPrecision  # noqa: E402
from lightning_te_moe.distributed.sharding import ready_for_sharding  # noqa: E402
from lightning_te_moe.dense import TEDenseLinear, TELinearEngine, swap_dense  # noqa: E402
from lightning_te_moe.policy.recipes import RecipeSpec  # noqa: E402
from lightning_te_moe.recompute import uninstall  # noqa: E402

# q/o 256x256, k/v 128x256 (multiples of 16), head dim 64 (TE's fused attention); both experts chosen by every
# token, so FP8 noise cannot flip the routing
SIZES = dict(hidden=256, intermediate=256, experts=2, top_k=2, layers=2)


def _context(recipe: str) -> AbstractContextManager:
    """What the plugin's forward context enters for ``recipe``: torch BF16 autocast, TE's autocast if quantized."""
    import transformer_engine.pytorch as te

    stack = ExitStack()
    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    spec = RecipeSpec.of(recipe)
    if spec.is_te:
        stack.enter_context(te.autocast(enabled=True, recipe=spec.build()))
    return stack


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model with transformers' own initialisation (std 0.02: activations of a real model's scale), fp32."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **SIZES)).cuda().train()


def _step(model: torch.nn.Module, ids: torch.Tensor,
          context: AbstractContextManager) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (next-token loss) and backward; the logits and every parameter's gradient in fp32."""
    with context:
        logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _with_te_linear(model: torch.nn.Module, paths: list[str]) -> torch.nn.Module:
    """``model`` with TE's own ``te.Linear`` modules (copies of the weights) at ``paths``: the obvious conversion."""
    import transformer_engine.pytorch as te

    for path in paths:
        linear = model.get_submodule(path)
        layer = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="cuda",
                          params_dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


@pytest.mark.parametrize("seq", [24, 23], ids=["rows-aligned", "rows-padded"])
@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_swapped_dense_layers_vs_the_unconverted_model(arch: str, recipe: str, seq: int) -> None:
    """BF16: the very same GEMMs (equal). FP8: every swapped layer ran on TE, within FP8's error of the unconverted
    (BF16 dense) model, and, with aligned rows, equal to the model converted to TE's own te.Linear modules."""
    ref = _model(arch)
    model = copy.deepcopy(ref)
    report = swap_dense(model)
    assert len(report.swapped) == 8
    ids = torch.randint(0, 64, (2, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want, want_grads = _step(ref, ids, _context(recipe))
    got, got_grads = _step(model, ids, _context(recipe))
    layers = [m for m in model.modules() if isinstance(m, TEDenseLinear)]
    assert got_grads.keys() == want_grads.keys()
    if recipe == "bf16":  # no quantized recipe: the swapped layers run F.linear, the very same GEMMs
        assert not any(m.calls for m in layers)
        assert torch.equal(got, want) and all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
        return
    assert all(m.calls["te"] == 1 for m in layers), [dict(m.calls) for m in layers]
    assert all(m.calls["te, rows padded"] == (seq == 23) for m in layers)
    assert all(torch.isfinite(g).all() for g in got_grads.values())
    flat = rel_err(torch.cat([g.flatten() for g in got_grads.values()]),
                   torch.cat([want_grads[n].flatten() for n in got_grads]))
    worst = sorted(((rel_err(got_grads[n], want_grads[n]), n) for n in want_grads), reverse=True)[:3]
    print(arch, recipe, seq, f"vs BF16 dense: logits {rel_err(got, want):.1e}, all gradients {flat:.1e};",
          "worst:", [f"{n} {e:.1e}" for e, n in worst])
    assert rel_err(got, want) <= 0.1 and flat <= 0.25
    if seq % 8 == 0:  # te.Linear itself refuses FP8 on row counts that are not multiples of 8
        te_model = _with_te_linear(copy.deepcopy(ref), [e.path for e in report.swapped])
        te_out, te_grads = _step(te_model, ids, _context(recipe))
        errors = {"logits": rel_err(got, te_out), **{n: rel_err(got_grads[n], te_grads[n]) for n in te_grads}}
        print(arch, recipe, f"vs te.Linear modules: {max(errors.values()):.1e}")
        assert got_grads.keys() == te_grads.keys() and max(errors.values()) <= 1e-5, errors


def test_state_dict_after_fp8_steps_loads_strictly_into_the_unconverted_model() -> None:
    recipe = fp8_recipes_here()[0]  # fp8_delayed on Hopper/Ada: the stateful one
    model = _model("mixtral")
    swap_dense(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    for _ in range(2):
        _step(model, ids, _context(recipe))
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    assert not any("_extra_state" in k for k in state)
    fresh = _model("mixtral", seed=1)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_step_down_changes_the_dense_recipe_from_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, object]] = []
    call = TELinearEngine.__call__

    def spy(self, x, weight, bias, recipe, **kwargs):
        seen.append((type(recipe).__name__, recipe.backward_override))
        return call(self, x, weight, bias, recipe, **kwargs)

    monkeypatch.setattr(TELinearEngine, "__call__", spy)
    plugin = TEMoEPrecision(recipe="fp8_current", print_plan=False, guard=False)  # auto is BF16 on some stacks
    model = plugin.convert_module(_model("gpt_oss")).cuda()
    print("plan:", plugin.plan.summary())
    assert plugin.plan.ladder[0].dense.is_te and not plugin.plan.ladder[-1].dense.is_te
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    per_step = []
    for _ in plugin.plan.ladder:
        seen.clear()
        with plugin.forward_context():
            loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        per_step.append(set(seen))
        plugin.state.step_down()
    expected = [{(type(plugin.state.te_recipe(r.dense)).__name__, r.dense.backward_override)}
                if r.dense.is_te else set() for r in plugin.plan.ladder]
    print("dense recipes per step:", per_step)
    assert per_step == expected


def _grads_with_plugin(base: torch.nn.Module, recipe: str, checkpointing: str, rung: int = 0,
                       params_dtype: str = "float32", sharded: bool = False) -> dict[str, torch.Tensor]:
    """One step of a fresh copy under a fresh plugin on the plan's ``rung``: ``checkpointing`` is "off", "ours" or
    "plain" (transformers' own checkpoint function, the wrapper removed); ``sharded``: the modules set up as for
    sharding (no quantized weights kept between calls). TE's global FP8 state starts as in a fresh process."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    FP8GlobalStateManager.reset()
    model = copy.deepcopy(base)
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plugin = TEMoEPrecision(recipe, print_plan=False, guard=False, params_dtype=params_dtype)
    plugin.convert_module(model)
    plugin.state.set_index(rung)
    if sharded:
        ready_for_sharding(model)
    assert rung == 0 or plugin.state.dense.backward_override == BACKWARD_OVERRIDE[params_dtype]
    if checkpointing == "plain":
        uninstall(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.cuda()
    ids = torch.randint(0, 64, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    return _step(model, ids, plugin.forward_context())[1]


@pytest.mark.parametrize("recipe", ["bf16", *fp8_recipes_here()])
def test_checkpointing_recomputes_under_the_forward_recipe(recipe: str) -> None:
    """Dense, expert and attention swaps on; the gradients with checkpointing equal those without, up to the
    run-to-run noise of two runs without it (TE's fused attention backward may accumulate in any order)."""
    base = _model("gpt_oss").cpu()
    first, second = (_grads_with_plugin(base, recipe, "off") for _ in range(2))
    ours = _grads_with_plugin(base, recipe, "ours")
    noise = max(rel_err(second[n], first[n]) for n in first)
    errors = {n: rel_err(ours[n], first[n]) for n in first}
    try:
        plain = _grads_with_plugin(base, recipe, "plain")
        without = f"{max(rel_err(plain[n], first[n]) for n in first):.1e}"
    except Exception as err:  # noqa: BLE001 - what plain checkpointing does under FP8 is what we report
        without = f"{type(err).__name__}: {str(err)[:120]}"
    print(recipe, f"noise {noise:.1e}, ours {max(errors.values()):.1e}, transformers' own checkpoint: {without}")
    assert ours.keys() == first.keys()
    assert max(errors.values()) <= max(1e-3, 10 * noise), errors


#: The ladder's high-precision-backward rung per parameter dtype (rule hp-backward-fp32-params).
BACKWARD_OVERRIDE = {"float32": "dequantized", "bfloat16": "high_precision"}


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("params_dtype", ["float32", "bfloat16"])
def test_checkpointing_after_a_step_down_to_a_high_precision_backward(params_dtype: str, sharded: bool) -> None:
    """The guard's first step down from FP8 current scaling (a ``backward_override``: dequantized with FP32
    parameters, high precision with BF16 ones) under non-reentrant checkpointing, with quantized weights kept or (as
    sharded) quantized on every call: the backward runs (in TE's recompute phases TE saved fewer tensors in the
    recompute than in the forward: torch's checkpoint stopped the backward of GPT-OSS-20B under FSDP2, 2026-11-28) and
    its gradients equal those without checkpointing."""
    base = _model("gpt_oss").cpu()
    first, second = (_grads_with_plugin(base, "fp8_current", "off", 1, params_dtype, sharded) for _ in range(2))
    ours = _grads_with_plugin(base, "fp8_current", "ours", 1, params_dtype, sharded)
    noise = max(rel_err(second[n], first[n]) for n in first)
    errors = {n: rel_err(ours[n], first[n]) for n in first}
    print(params_dtype, "sharded" if sharded else "cached",
          f"noise {noise:.1e}, checkpointed {max(errors.values()):.1e}")
    assert ours.keys() == first.keys()
    assert max(errors.values()) <= max(1e-3, 10 * noise), errors


def test_fit_with_gradient_checkpointing_and_dense_on_te(tmp_path: Path) -> None:
    model = _model("gpt_oss").cpu()
    model.gradient_checkpointing_enable()
    plugin, module = gpu_fit(model, tmp_path, recipe="fp8_current")  # named: auto is BF16 below cuBLASLt 13.5
    swaps = [d.reason for d in plugin.decisions.decisions if d.kind == "swap"]
    print("plan:", plugin.plan.summary(), "swaps:", swaps, "losses:", [round(v, 3) for v in module.losses[::5]])
    assert any(r.startswith("swapped 8 dense linear layer(s)") for r in swaps)
    assert any(r.startswith("gradient checkpointing of") for r in swaps)
    assert all(math.isfinite(v) for v in module.losses)
    assert sum(module.losses[-5:]) / 5 < 0.7 * sum(module.losses[:5]) / 5


@pytest.mark.parametrize("recipe", [r for r in fp8_recipes_here() if r != "fp8_delayed"])  # delayed: TE's cache
def test_frozen_dense_weights_live_on_the_gpu_only_quantized(recipe: str) -> None:
    """A LoRA base (frozen dense weights) under a stateless FP8 recipe: after the first step only TE's quantized
    copies stay on the GPU (the BF16 values on the host), with the numbers of TE's own weight cache; the state dict
    keeps the exact values, and a BF16 rung brings them back to the GPU."""
    sizes = dict(SIZES, hidden=512, intermediate=256)  # q/o 512x512: enough bytes for the memory to show

    def model(resident: bool) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt_oss", **sizes)).cuda().bfloat16().train()
        swap_dense(m)
        for layer in m.modules():
            if isinstance(layer, TEDenseLinear):
                layer.weight.requires_grad_(False)
                layer._resident.enabled = resident
        return m

    def dense_bytes(m: torch.nn.Module) -> int:
        return sum(lin.weight.numel() * 2 for lin in m.modules() if isinstance(lin, TEDenseLinear))

    ids = torch.randint(0, 64, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results, allocated = {}, {}
    for resident in (False, True):
        m = model(resident)
        original = {k: v.clone() for k, v in m.state_dict().items()}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        steps = [_step(m, ids, _context(recipe)) for _ in range(2)]
        for p in m.parameters():
            p.grad = None
        torch.cuda.synchronize()
        allocated[resident] = torch.cuda.memory_allocated() - base
        results[resident] = [(logits.cpu(), {k: g.cpu() for k, g in grads.items()}) for logits, grads in steps]
        layers = [lin for lin in m.modules() if isinstance(lin, TEDenseLinear)]
        if resident:
            assert all(lin.weight.device.type == "cpu" and lin.calls["te"] == 2 for lin in layers)
            state = m.state_dict()
            assert all(torch.equal(state[k].cpu(), v.cpu()) for k, v in original.items())
            _step(m, ids, _context("bf16"))  # a BF16 rung: the plain weights, back on the GPU
            assert all(lin.weight.device.type == "cuda" and lin._resident._quantized is None for lin in layers)
        del m, steps
    print(recipe, "GPU bytes kept after two steps: TE cache + BF16", allocated[False], "quantized only",
          allocated[True], "BF16 dense weights", dense_bytes(model(False)))
    assert allocated[False] - allocated[True] >= 0.9 * dense_bytes(model(False))
    for (got, got_grads), (want, want_grads) in zip(results[True], results[False]):  # the same quantized weights
        assert got_grads.keys() == want_grads.keys()
        errors = {"logits": rel_err(got, want), **{k: rel_err(got_grads[k], want_grads[k]) for k in want_grads}}
        print(recipe, "held vs TE's cache, largest difference:", max(errors.values()))
        assert max(errors.values()) <= 1e-3, errors
