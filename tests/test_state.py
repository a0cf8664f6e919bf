"""PrecisionState: the active rung, its changes and listeners; RecipeSpec identity."""

from __future__ import annotations

import pytest

from lightning_te_moe import Environment, RecipeSpec, make_plan
from lightning_te_moe.policy.state import PrecisionState


def _state() -> PrecisionState:
    return PrecisionState(make_plan(Environment.assume(cc="9.0", te="2.20.2", cublaslt="13.10.0")))


def test_step_down_walks_the_ladder_and_notifies():
    state, seen = _state(), []
    state.on_change(lambda old, new: seen.append((old.label(), new.label())))
    assert state.experts.alignment == 16
    assert state.step_down().label() == "fp8_current+dq_bwd"
    assert state.dense.backward_override == "dequantized"
    assert state.step_down().label() == "bf16"
    assert state.experts.alignment == 1 and not state.can_step_down
    assert state.step_down() is None
    assert seen == [("fp8_current", "fp8_current+dq_bwd"), ("fp8_current+dq_bwd", "bf16")]


def test_set_index_outside_ladder_is_an_error():
    with pytest.raises(ValueError, match=r"rung 3 is outside the ladder \(0..2\)"):
        _state().set_index(3)


def test_plain_dtype_recipes_build_no_te_object():
    state = _state()
    assert state.te_recipe(RecipeSpec.of("bf16")) is None


def test_recipe_specs_are_hashable_by_value():
    a, b = RecipeSpec.of("nvfp4", disable_rht=True), RecipeSpec("nvfp4", {"disable_rht": True})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert RecipeSpec.of("nvfp4") != a
    with pytest.raises(ValueError, match="valid recipe names are"):
        RecipeSpec("int4")
