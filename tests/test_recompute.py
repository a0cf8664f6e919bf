"""Activation checkpointing recomputes under the forward's precision (CPU, torch BF16 autocast and the TE stand-in
of ``te_standin.py``): gradients equal to the run without checkpointing, whether checkpointing was enabled before
the plugin's setup or after, reentrant or not; without the wrapper the recompute leaves the recipe."""

from __future__ import annotations

import copy
import inspect

import pytest
import te_standin
import torch
from experts_helpers import tiny_model

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.policy import Environment
from lightning_te_moe.recompute import PrecisionRecompute, install, uninstall


@pytest.fixture
def te(monkeypatch: pytest.MonkeyPatch) -> te_standin.State:
    import lightning_te_moe.dense.swap as swap_mod
    import lightning_te_moe.plugin as plugin_mod

    state = te_standin.install(monkeypatch)
    hopper = Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")  # a stack whose auto plan runs FP8 dense
    monkeypatch.setattr(plugin_mod, "probe_environment", lambda device=None: hopper)
    monkeypatch.setattr(swap_mod, "te_available", lambda: True)
    return state


def _setup(model: torch.nn.Module, recipe: str = "auto") -> TEMoEPrecision:
    plugin = TEMoEPrecision(recipe, print_plan=False, swap_attention=False, guard=False)
    plugin.convert_module(model)
    return plugin


def _grads(plugin: TEMoEPrecision, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with plugin.forward_context():
        loss = model(input_ids=ids).logits.float().square().mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _reference(te: te_standin.State) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny GPT-OSS in training mode, and its gradients without checkpointing under the plugin (FP8 current)."""
    model = tiny_model("gpt_oss").train()
    original = copy.deepcopy(model)
    grads = _grads(_setup(model), model)
    assert len(te.calls) == 8 and not any(c.recompute for c in te.calls)
    te.calls.clear()
    return original, grads


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_enabled_before_setup_recomputes_under_the_forward_recipe(te: te_standin.State,
                                                                                reentrant: bool) -> None:
    model, expected = _reference(te)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plugin = _setup(model)
    recompute = [d for d in plugin.decisions.decisions if "gradient checkpointing" in d.reason]
    assert len(recompute) == 1 and recompute[0].reason.startswith("gradient checkpointing of 3 layer(s) recomputes")
    grads = _grads(plugin, model)
    assert grads.keys() == expected.keys()
    assert all(torch.equal(grads[n], expected[n]) for n in grads)
    assert te.phases == []  # current scaling: no TE recompute phases (they change what TE saves, for nothing)
    assert len(te.calls) == 16 and len({c.recipe for c in te.calls}) == 1  # 8 TE calls, recomputed on the recipe


def _checkpointed_grads(recipe: str, step_downs: int) -> tuple[TEMoEPrecision, dict, dict]:
    """The same tiny GPT-OSS without and with (non-reentrant) checkpointing, on the plan's rung ``step_downs``."""
    model = tiny_model("gpt_oss").train()
    twin = copy.deepcopy(model)
    plugins = [_setup(model, recipe), _setup(twin, recipe)]
    for plugin in plugins:
        for _ in range(step_downs):
            plugin.state.step_down()
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return plugins[1], _grads(plugins[0], model), _grads(plugins[1], twin)


def test_delayed_scaling_recomputes_in_te_phases(te: te_standin.State) -> None:
    plugin, expected, grads = _checkpointed_grads("fp8_delayed", 0)
    assert plugin.state.dense.name == "fp8_delayed"
    assert all(torch.equal(grads[n], expected[n]) for n in expected)
    assert te.phases == ["forward", "forward", "recompute", "recompute"]  # TE's phases: 2 decoder layers


def test_a_step_down_to_a_high_precision_backward_keeps_checkpointed_training_going(te: te_standin.State) -> None:
    """TE saves a tensor more in its recompute phases' forward than in their recompute under a backward_override (the
    stand-in does as TE 2.20 does); torch's non-reentrant checkpoint counts them: in the phases this backward failed
    at full size after the guard's step-down (docs/distributed.md)."""
    plugin, expected, grads = _checkpointed_grads("auto", 1)
    override = plugin.state.dense.backward_override  # FP32 parameters: the dequantized backward (rules.py)
    assert plugin.state.dense.name == "fp8_current" and override is not None
    assert grads.keys() == expected.keys() and all(torch.equal(grads[n], expected[n]) for n in expected)
    recipes = {c.recipe for c in te.calls}  # 8 TE calls without checkpointing, 8 + 8 recomputed with it
    assert te.phases == [] and len(te.calls) == 24 and len(recipes) == 1 and override in recipes.pop()


def test_checkpointing_enabled_after_setup_is_wrapped_too(te: te_standin.State) -> None:
    model, expected = _reference(te)
    plugin = _setup(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and isinstance(layer._gradient_checkpointing_func, PrecisionRecompute)
    grads = _grads(plugin, model)
    assert all(torch.equal(grads[n], expected[n]) for n in expected)
    model.gradient_checkpointing_disable()
    assert not layer.gradient_checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_without_it_the_recompute_leaves_the_recipe(te: te_standin.State, reentrant: bool) -> None:
    model, expected = _reference(te)
    plugin = _setup(model)
    assert uninstall(model) == 0  # nothing was wrapped yet; the hook on _set_gradient_checkpointing goes
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert not isinstance(model.model.layers[0]._gradient_checkpointing_func, PrecisionRecompute)
    grads = _grads(plugin, model)
    assert any(not torch.equal(grads[n], expected[n]) for n in expected)  # silently other gradients
    assert len(te.calls) == 8 and te.phases == []  # the recompute ran F.linear in BF16, outside the FP8 recipe


def test_install_is_idempotent_and_keeps_transformers_signature_check() -> None:
    model = tiny_model("mixtral").train()
    model.gradient_checkpointing_enable()
    assert install(model) == 3 and install(model) == 0
    assert "value" not in inspect.signature(model._set_gradient_checkpointing).parameters  # the current format
    inner = model.model.layers[1]._gradient_checkpointing_func.inner
    assert inner.keywords == {"use_reentrant": False}  # the user's own checkpoint function and kwargs
    assert uninstall(model) == 3 and model.model.layers[1]._gradient_checkpointing_func is inner
    assert "_set_gradient_checkpointing" not in model.__dict__


def test_outside_grad_mode_the_layer_runs_once_without_te_state(te: te_standin.State) -> None:
    calls = []
    wrapped = PrecisionRecompute(lambda fn, *args: calls.append(fn) or fn(*args))
    with torch.no_grad():
        assert wrapped(torch.neg, torch.ones(2)).tolist() == [-1.0, -1.0]
    assert calls == [torch.neg] and te.phases == []
