"""Frozen expert weights held on the GPU only as TE's quantized copies (``experts/resident.py``).

TE does not run on the CPU: a stand-in engine "quantizes" by rounding to BF16 and hands its copies over the way
``TEGroupedGemm.take_quantized`` does; the module must reuse them while the weight and recipe are unchanged,
quantize again when either changes or grad mode needs the backward copies, and go back to the plain weight on a
rung without quantization. Moving the values to the host and back is covered on the GPU
(``tests/gpu/test_experts_resident_gpu.py``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from experts_helpers import precision_state, tiny_model

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts
from lightning_te_moe.experts import module as experts_module
from lightning_te_moe.experts.resident import ResidentWeights


@dataclass
class _Recipe:
    """Stand-in for a TE recipe: a class name and fields, as the key compares them."""

    backward_override: Optional[str] = None


class DelayedScaling(_Recipe):
    """Named like TE's stateful recipe."""


class _QuantizingEngine:
    """TE's math with "quantization" = rounding to BF16; records how each call got its weights."""

    calls: list[str] = []

    def __init__(self, num_gemms: int, in_features: int, out_features: int, *args: Any, **kwargs: Any) -> None:
        self.out_features = out_features
        self._last: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, weight: Any, splits: list[int], bias: Any = None, device_splits: Any = None,
                 recipe: Any = None, fresh: bool = False) -> torch.Tensor:
        if isinstance(weight, list):
            self.calls.append("held")
            experts = weight
        else:
            self.calls.append("fresh" if fresh else "plain")
            experts = [w.detach().bfloat16().float() for w in weight] if fresh else list(weight)
            self._last = experts if fresh else []
        parts = [F.linear(chunk, experts[e]) for e, chunk in enumerate(x.split(splits)) if splits[e]]
        return torch.cat(parts) if parts else x.new_zeros(0, self.out_features)

    def take_quantized(self) -> list[torch.Tensor]:
        return self._last


def _frozen_experts(monkeypatch: pytest.MonkeyPatch, recipe: Any) -> GroupedExperts:
    layer = tiny_model("mixtral").model.layers[0].mlp.experts  # no biases: the GEMMs carry everything
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(layer)
    swap_experts(holder, ExpertSwapConfig(backend="torch"), state=precision_state("bf16"))
    experts = holder.experts
    experts.requires_grad_(False)
    _QuantizingEngine.calls = []
    monkeypatch.setattr(experts_module, "TEGroupedGemm", _QuantizingEngine)
    monkeypatch.setattr(experts, "_use_te", lambda x: True)
    monkeypatch.setattr(experts, "_precision", lambda use_te: nullcontext())
    monkeypatch.setattr(experts_module, "active_recipe", lambda: recipe[0])
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda r, dtype: False)
    monkeypatch.setattr(experts_module, "fused_permutation_available", lambda: False)
    activation = experts.activation
    monkeypatch.setattr(activation, "forward", lambda h, fused=False: type(activation).forward(activation, h))
    return experts


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 32, generator=gen)
    index = torch.randint(0, 8, (11, 2), generator=gen)
    return x, index, torch.rand(11, 2, generator=gen)


def test_frozen_weights_are_quantized_once_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe: list[Any] = [_Recipe()]
    experts = _frozen_experts(monkeypatch, recipe)
    x, index, weights = _inputs()
    first = experts(x.requires_grad_(True), index, weights)
    again = experts(x, index, weights)
    assert _QuantizingEngine.calls == ["fresh", "fresh", "held", "held"]  # fc1, fc2, then both reused
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    reference = copy.deepcopy(experts)
    recipe[0] = None  # a rung without quantization: the plain weights, nothing held
    plain = experts(x, index, weights)
    assert _QuantizingEngine.calls[-2:] == ["plain", "plain"]
    assert all(r._quantized is None for r in experts._resident.values())
    assert (plain - first).abs().max() > 0  # the held copies were the rounded ones
    assert reference._resident["fc1"]._quantized is None  # a copy holds no quantized tensors


def test_a_changed_weight_or_recipe_quantizes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe: list[Any] = [_Recipe()]
    experts = _frozen_experts(monkeypatch, recipe)
    x, index, weights = _inputs()
    experts(x, index, weights)
    with torch.no_grad():
        experts.fc1.weight.mul_(2.0)  # e.g. load_state_dict
    experts(x, index, weights)
    assert _QuantizingEngine.calls[2:] == ["fresh", "held"]
    recipe[0] = _Recipe("dequantized")  # a backward override needs the high-precision weights
    experts(x, index, weights)
    assert _QuantizingEngine.calls[4:] == ["plain", "plain"]


def test_copies_made_without_grad_are_redone_for_training(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = _frozen_experts(monkeypatch, [_Recipe()])
    x, index, weights = _inputs()
    with torch.no_grad():
        experts(x, index, weights)  # validation first: only the forward copies
    experts(x, index, weights)
    with torch.no_grad():
        experts(x, index, weights)
    assert _QuantizingEngine.calls == ["fresh", "fresh", "fresh", "fresh", "held", "held"]


@pytest.mark.parametrize("case", ["trainable", "delayed", "disabled"])
def test_only_frozen_weights_under_a_stateless_recipe_are_held(case: str) -> None:
    weight = torch.nn.Parameter(torch.randn(2, 4, 4), requires_grad=case == "trainable")
    recipe = DelayedScaling() if case == "delayed" else _Recipe()
    assert not ResidentWeights(enabled=case != "disabled").eligible(weight, recipe)
    assert ResidentWeights().eligible(weight.detach(), _Recipe())
    assert not ResidentWeights().eligible(weight.detach(), None)
