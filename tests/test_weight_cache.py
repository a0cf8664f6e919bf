"""When TE may reuse its quantized expert weights: every change to the weight or its quantization re-quantizes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lightning_te_moe.experts.weight_cache import QuantizedWeightCache


@dataclass
class _Recipe:
    """A stand-in for a TE recipe (compared by class and fields, as the cache does)."""

    margin: int = 0


def _weight(requires_grad: bool = True) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(4, 8, 8), requires_grad=requires_grad)


def test_unchanged_weight_is_reused_until_it_changes() -> None:
    w, cache, recipe = _weight(), QuantizedWeightCache(), _Recipe()
    assert cache.first_microbatch(w, recipe) is True
    assert cache.first_microbatch(w, recipe) is False  # micro-batch 2 of the same step
    with torch.no_grad():
        w.add_(1.0)
    assert cache.first_microbatch(w, recipe) is True
    assert cache.first_microbatch(w, recipe) is False


@pytest.mark.parametrize("kwargs", [{}, {"foreach": True}, {"fused": True}], ids=["for-loop", "foreach", "fused"])
def test_every_optimizer_step_requantizes(kwargs: dict) -> None:
    """Fused AdamW updates in place without bumping the version counter: the step hook still catches it."""
    w, cache, recipe = _weight(), QuantizedWeightCache(), _Recipe()
    optimizer = torch.optim.AdamW([w], lr=0.1, **kwargs)
    cache.first_microbatch(w, recipe)
    w.grad = torch.ones_like(w)
    optimizer.step()
    assert cache.first_microbatch(w, recipe) is True
    assert cache.first_microbatch(w, recipe) is False


def test_frozen_weight_stays_cached_across_other_parameters_steps() -> None:
    w, other, cache, recipe = _weight(requires_grad=False), _weight(), QuantizedWeightCache(), _Recipe()
    optimizer = torch.optim.SGD([other], lr=0.1)
    assert cache.first_microbatch(w, recipe) is True
    for _ in range(3):
        other.grad = torch.ones_like(other)
        optimizer.step()
        assert cache.first_microbatch(w, recipe) is False  # quantized once


def test_load_state_dict_recipe_grad_mode_and_data_swap_requantize() -> None:
    module = torch.nn.Module()
    module.w = _weight()
    cache, recipe = QuantizedWeightCache(), _Recipe()
    cache.first_microbatch(module.w, recipe)
    module.load_state_dict({"w": torch.zeros(4, 8, 8)})
    assert cache.first_microbatch(module.w, recipe) is True
    assert cache.first_microbatch(module.w, _Recipe(margin=1)) is True  # same class, other settings
    with torch.no_grad():
        assert cache.first_microbatch(module.w, _Recipe(margin=1)) is True  # eval caches other copies
    assert cache.first_microbatch(module.w, _Recipe(margin=1)) is True
    module.w.data = torch.ones(4, 8, 8)  # new storage, version counter not bumped
    assert cache.first_microbatch(module.w, _Recipe(margin=1)) is True


def test_no_recipe_disabled_and_invalidate() -> None:
    w, recipe = _weight(), _Recipe()
    cache = QuantizedWeightCache()
    assert cache.first_microbatch(w, None) is None  # BF16: TE quantizes nothing
    assert cache.first_microbatch(w, recipe) is True
    assert cache.first_microbatch(w, None) is None
    assert cache.first_microbatch(w, recipe) is True  # a BF16 interlude forgets the copy
    cache.invalidate()
    assert cache.first_microbatch(w, recipe) is True
    off = QuantizedWeightCache(enabled=False)
    assert off.first_microbatch(w, recipe) is None and off.first_microbatch(w, recipe) is None


def test_for_call_a_held_copy_takes_none_and_a_fresh_one_is_forgotten() -> None:
    """A held quantized copy is TE's primary weight (no ``is_first_microbatch``); a fresh quantization whose copies
    leave TE is True and forgets the cache, so the next plain call of the same weight quantizes again."""
    cache, weight, recipe = QuantizedWeightCache(), torch.nn.Parameter(torch.ones(4, 4)), _Recipe()
    assert cache.for_call(weight, recipe) is True and cache.for_call(weight, recipe) is False
    assert cache.for_call(weight, recipe, held=True) is None and cache.for_call(weight, recipe) is False
    assert cache.for_call(weight, recipe, fresh=True) is True and cache.for_call(weight, recipe) is True
