"""The dense layers' TE path on the CPU, through a TE stand-in with TE's interface (``te_standin.py``): the math
handed to ``te.Linear``, row padding, weight-dimension fallbacks, the quantized-weight cache, and the plugin's
step-down ladder reaching the dense recipe from the next step."""

from __future__ import annotations

import copy
import warnings

import pytest
import te_standin
import torch
import torch.nn.functional as F
from experts_helpers import rel_err, tiny_model
from te_standin import Float8CurrentScaling, MXFP8BlockScaling, autocast, fake_fp8
from torch import nn

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.dense import TEDenseLinear, swap_dense
from lightning_te_moe.policy import Environment


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch) -> te_standin.State:
    return te_standin.install(monkeypatch)


def _layer(in_features: int = 32, out_features: int = 48, bias: bool = True) -> tuple[TEDenseLinear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(in_features, out_features, bias=bias)
    return TEDenseLinear.from_linear(copy.deepcopy(ref)), ref


@pytest.mark.parametrize("rows", [16, 15])
def test_te_linear_gets_our_weight_bias_and_input_and_its_result_comes_back(te: te_standin.State, rows: int) -> None:
    """15 rows: padded to 16 with zero rows for TE, cut off again; the zero rows change no value or gradient (up to
    the order of the weight- and bias-gradient sums)."""
    layer, ref = _layer()
    x = torch.randn(rows, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with autocast(recipe=Float8CurrentScaling()):
        out = layer(x.reshape(1, rows, 32))
    expected = F.linear(fake_fp8(x_ref), fake_fp8(ref.weight), ref.bias)
    assert out.shape == (1, rows, 48) and torch.equal(out.reshape(rows, 48), expected)
    grad = torch.randn(rows, 48)
    out.reshape(rows, 48).backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert rel_err(layer.weight.grad, ref.weight.grad) <= 1e-6 and rel_err(layer.bias.grad, ref.bias.grad) <= 1e-6
    assert [c.rows for c in te.calls] == [16]
    assert layer.calls == ({"te": 1} if rows == 16 else {"te": 1, "te, rows padded": 1})
    assert not dict(layer.named_parameters(recurse=True)).keys() - {"weight", "bias"}  # no TE module inside


def test_outside_a_quantized_recipe_it_is_f_linear(te: te_standin.State) -> None:
    layer, ref = _layer(bias=False)
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), ref(x)) and not te.calls and not layer.calls
    with autocast(enabled=False):
        assert torch.equal(layer(x), ref(x)) and not te.calls


def test_weight_dimensions_the_recipe_cannot_take_fall_back_with_a_reason(te: te_standin.State) -> None:
    layer, ref = _layer(in_features=48, out_features=64)  # 48: a multiple of 16, not of MXFP8's 32
    x = torch.randn(32, 48)
    with autocast(recipe=MXFP8BlockScaling()), pytest.warns(UserWarning, match="needs in/out features that are"
                                                                              " multiples of 32"):
        assert torch.equal(layer(x), ref(x))
    with autocast(recipe=MXFP8BlockScaling()), warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason
        layer(x)
    assert layer.calls == {"MXFP8BlockScaling needs in/out features that are multiples of 32 (this layer: 48/64)": 2}
    with autocast(recipe=Float8CurrentScaling()):
        layer(x)
    assert layer.calls["te"] == 1 and te.calls[-1].recipe.startswith("Float8CurrentScaling")


def _steps(layer: TEDenseLinear, micro_batches: int, steps: int = 3) -> None:
    """Optimizer steps of ``layer`` and a head after it, ``micro_batches`` forward/backward passes each."""
    head = nn.Linear(48, 1)
    params = [p for p in [*layer.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for _ in range(steps):
        for _ in range(micro_batches):
            with autocast(recipe=Float8CurrentScaling()):
                head(layer(torch.randn(16, 32))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_trainable_weight_is_quantized_once_per_step_and_reused_across_micro_batches(te: te_standin.State) -> None:
    layer, _ = _layer()
    _steps(layer, micro_batches=2)
    assert [c.first_microbatch for c in te.calls] == [True, False] * 3
    assert layer._engines["cpu"].module.quantized == 3


@pytest.mark.parametrize("frozen", [False, True])
def test_a_layer_ready_for_sharding_quantizes_on_every_call_and_keeps_no_copy(te: te_standin.State,
                                                                                frozen: bool) -> None:
    """Sharded (FSDP): each rank gathers the whole weight for a call; a quantized copy kept between calls would be
    the whole weight on every rank. After a first cached step, ``ready_for_sharding`` drops it: from then on TE gets
    ``is_first_microbatch=None`` (no cache), micro-batches included, and a frozen weight is no longer held quantized."""
    from lightning_te_moe.distributed.sharding import ready_for_sharding

    layer, ref = _layer()
    layer.weight.requires_grad_(not frozen)
    _steps(layer, micro_batches=2, steps=1)
    assert [c.first_microbatch for c in te.calls] == ([True, None] if frozen else [True, False])
    ready_for_sharding(nn.Sequential(layer))
    assert not layer._engines and layer.weight.device.type == "cpu"
    assert torch.equal(layer.weight, ref.weight) == frozen  # a frozen weight's values come back from the host
    _steps(layer, micro_batches=2, steps=2)
    assert [c.first_microbatch for c in te.calls][2:] == [None] * 4
    assert not layer._engines["cpu"].module._fp8_workspaces


def test_frozen_weight_is_quantized_once_and_its_quantized_copy_replaces_tes_cache(te: te_standin.State) -> None:
    """A LoRA base: quantized at the first call, then TE takes the held copy as a primary quantized weight (no
    ``is_first_microbatch``, no quantization, no second copy in TE's cache)."""
    layer, ref = _layer()
    layer.weight.requires_grad_(False)
    _steps(layer, micro_batches=1, steps=4)
    assert [c.first_microbatch for c in te.calls] == [True, None, None, None]
    engine = layer._engines["cpu"].module
    assert engine.quantized == 1 and not engine._fp8_workspaces
    x = torch.randn(16, 32)
    with autocast(recipe=Float8CurrentScaling()):  # the bias trained, the held weight is the frozen one
        assert torch.equal(layer(x), F.linear(fake_fp8(x), fake_fp8(ref.weight), layer.bias))
    assert layer.weight.device.type == "cpu" and torch.equal(layer.weight, ref.weight)  # the values, unchanged


def test_held_copy_is_dropped_by_a_plain_call_a_changed_weight_or_a_backward_override(te: te_standin.State) -> None:
    layer, ref = _layer()
    layer.weight.requires_grad_(False)
    x = torch.randn(16, 32)
    with autocast(recipe=Float8CurrentScaling()):
        layer(x)
    assert layer._resident._quantized is not None
    assert torch.equal(layer(x), ref(x)) and layer._resident._quantized is None  # a BF16 rung: the plain weight
    with autocast(recipe=Float8CurrentScaling()):
        layer(x)
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. load_state_dict
    with autocast(recipe=Float8CurrentScaling()):
        assert torch.equal(layer(x), F.linear(fake_fp8(x), fake_fp8(layer.weight), layer.bias))
    with autocast(recipe=Float8CurrentScaling(backward_override="dequantized")):
        layer(x)  # a backward override needs the high-precision weight: TE's own cache again
    assert [c.first_microbatch for c in te.calls] == [True, True, None, True, True]
    assert layer._resident._quantized is None


def test_a_copy_made_for_a_forward_only_is_made_again_when_a_backward_follows(te: te_standin.State) -> None:
    """Without an input gradient TE makes no transposed copy: a later call whose input needs one quantizes again."""
    layer, _ = _layer()
    layer.weight.requires_grad_(False)
    x = torch.randn(16, 32)
    with autocast(recipe=Float8CurrentScaling()):
        layer(x)  # the first layer of a LoRA model: its input needs no gradient
        layer(x.requires_grad_(True))
        with torch.no_grad():
            layer(x)
        layer(x)
    assert [c.first_microbatch for c in te.calls] == [True, True, None, None]


def test_cache_off_quantizes_on_every_call(te: te_standin.State) -> None:
    layer, _ = _layer()
    layer.cache_quantized_weights = False
    _steps(layer, micro_batches=2, steps=1)
    assert [c.first_microbatch for c in te.calls] == [None, None]


def test_swapped_model_computes_the_original_with_te_linear_on_exactly_the_swapped_layers(te: te_standin.State) -> None:
    """The reference: the unswapped model with the stand-in's te.Linear math put into the same layers by hand."""
    ref = tiny_model("qwen3_moe")
    model = copy.deepcopy(ref)
    report = swap_dense(model)
    for entry in report.swapped:
        linear = ref.get_submodule(entry.path)
        linear.forward = lambda x, m=linear: F.linear(fake_fp8(x), fake_fp8(m.weight), m.bias)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with autocast(recipe=Float8CurrentScaling()):
        logits = model(input_ids=ids).logits
    expected = ref(input_ids=ids).logits
    assert len(te.calls) == len(report.swapped) == 8 and {c.rows for c in te.calls} == {16}
    assert torch.equal(logits, expected)
    logits.square().mean().backward()
    expected.square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), name


def _hopper_plugin(monkeypatch: pytest.MonkeyPatch, **kwargs) -> TEMoEPrecision:
    """A plugin that plans for an H100 with TE 2.20 and cuBLASLt 13.10 (its forward context enters the stand-in's
    autocast)."""
    import lightning_te_moe.dense.swap as swap_mod
    import lightning_te_moe.plugin as plugin_mod

    h100 = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")  # experts and dense both on fp8_current
    monkeypatch.setattr(plugin_mod, "probe_environment", lambda device=None: h100)
    monkeypatch.setattr(swap_mod, "te_available", lambda: True)
    return TEMoEPrecision(print_plan=False, swap_attention=False, guard=False, **kwargs)


def test_a_step_down_changes_the_dense_recipe_from_the_next_step(te: te_standin.State,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = _hopper_plugin(monkeypatch)
    model = plugin.convert_module(tiny_model("gpt_oss"))
    assert plugin.plan.summary() == "fp8_current -> fp8_current+dq_bwd -> bf16"
    swap = next(d for d in plugin.decisions.decisions if d.reason.startswith("swapped 8 dense"))
    assert swap.kind == "swap" and len(swap.evidence["entries"]) == 12
    ids = torch.randint(0, 64, (2, 8))
    seen = []
    for _ in range(3):
        te.calls.clear()
        with plugin.forward_context():
            loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        seen.append((len(te.calls), {c.recipe for c in te.calls}))
        plugin.state.step_down()  # what the guard does on divergence, between two steps
    assert seen == [(8, {"Float8CurrentScaling(backward_override=None, fp8_format=Format.HYBRID)"}),
                    (8, {"Float8CurrentScaling(backward_override=dequantized, fp8_format=Format.HYBRID)"}),
                    (0, set())]  # bf16: the swapped layers run F.linear
