"""Biases on the TE path: TE's GEMM epilogue adds them (trainable weights), the outside path stays for frozen weights.

TE does not run on the CPU, so a stand-in engine with TE's contract (``y_e = x_e @ w_e.T + b_e``, gradients by
autograd) takes the place of ``TEGroupedGemm``; the swapped module must then compute exactly what its torch
backend (biases outside the GEMMs) computes: outputs and every gradient. For the fused routing, stand-ins with the
placement rule of TE's permute/unpermute kernels (checked against the torch dispatch in
``test_experts_fused_routing.py``) take the place of the Triton kernels.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from experts_helpers import precision_state, rel_err, tiny_model

from lightning_te_moe.experts import ExpertSwapConfig, GroupedExperts, swap_experts
from lightning_te_moe.experts import module as experts_module
from lightning_te_moe.experts import te_routing
from lightning_te_moe.experts.gemm import te_applies_bias
from lightning_te_moe.experts.routing import make_dispatch

CALLS: list[tuple[str, bool]] = []
SPLITS: list[tuple[bool, list[int]]] = []


class _FakeEngine:
    """TE ``GroupedLinear``'s math over the caller's parameters, with or without the bias (like ``TEGroupedGemm``)."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, device: torch.device,
                 params_dtype: torch.dtype, bias: bool = False, cache_weights: bool = True,
                 native: bool = False) -> None:
        self.bias, self.out_features, self.native = bias, out_features, native

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, splits: list[int],
                 bias: Optional[torch.Tensor] = None, device_splits: Optional[torch.Tensor] = None,
                 recipe: Any = None) -> torch.Tensor:
        assert (bias is not None) == self.bias
        CALLS.append((f"{weight.shape[1]}x{weight.shape[2]}", bias is not None))
        assert device_splits is not None and device_splits.dtype == torch.int64
        splits = device_splits.tolist() if self.native else splits
        SPLITS.append((self.native, splits))
        parts = [F.linear(chunk, weight[e], None if bias is None else bias[e])
                 for e, chunk in enumerate(x.split(splits)) if splits[e]]
        return torch.cat(parts) if parts else x.new_zeros(0, self.out_features)


def _pair(monkeypatch: pytest.MonkeyPatch, recipe: str = "bf16") -> tuple[GroupedExperts, GroupedExperts]:
    """(torch backend reference, the same module on the stand-in TE path)."""
    layer = tiny_model("gpt_oss").model.layers[0].mlp.experts
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(layer)
    swap_experts(holder, ExpertSwapConfig(backend="torch"), state=precision_state(recipe))
    ref = holder.experts
    assert isinstance(ref, GroupedExperts) and ref.fc1.bias is not None and ref.fc2.bias is not None
    te = copy.deepcopy(ref)
    monkeypatch.setattr(experts_module, "TEGroupedGemm", _FakeEngine)
    monkeypatch.setattr(te, "_use_te", lambda x: True)
    monkeypatch.setattr(te, "_precision", lambda use_te: nullcontext())  # TE's autocast: not on the CPU
    monkeypatch.setattr(experts_module, "active_recipe", lambda: None)
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: False)
    activation = te.activation
    monkeypatch.setattr(activation, "forward", lambda h, fused=False: type(activation).forward(activation, h))
    return ref, te


def _step(module: GroupedExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = module(xi, index, wi)
    (out.square().sum() + out[:, 0].sum()).backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return {"out": out.detach(), "x": xi.grad, "weights": wi.grad, **grads}


def _routing(tokens: int = 13, experts: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, 32, generator=gen)
    index = torch.randint(0, experts - 3, (tokens, 2), generator=gen)  # the last 3 experts get no token
    index[::4, 1] = experts  # expert-parallel sentinel slots: dropped
    return x, index, torch.rand(tokens, 2, generator=gen)


@pytest.mark.parametrize("recipe", ["bf16", "fp8_current"], ids=["no-padding", "padded-to-16"])
def test_biases_in_the_te_gemm_compute_the_same_function(monkeypatch: pytest.MonkeyPatch, recipe: str) -> None:
    """Trainable weights: both biases go to the engine (fc2's inside the rows, before the routing weight)."""
    ref, te = _pair(monkeypatch, recipe)
    x, index, weights = _routing()
    CALLS.clear()
    want, got = _step(ref, x, index, weights), _step(te, x, index, weights)
    assert [with_bias for _, with_bias in CALLS] == [True, True]
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None, name
        assert rel_err(got[name], want[name]) <= 1e-5, name
    assert sorted(te._engines, key=str) == sorted([("fc1", "cpu", True, False), ("fc2", "cpu", True, False)], key=str)


def _te_permute(hidden: torch.Tensor, routing_map: torch.Tensor, rows: int,
                pad_offsets: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TE's permute kernel on the CPU: token t of expert e to row ``pad_offset[e] + start[e] + rank``, rest zero."""
    mask = routing_map.long()
    counts = mask.sum(0)
    offsets = pad_offsets if pad_offsets is not None else torch.zeros_like(counts)
    dest = torch.where(routing_map, offsets + torch.cumsum(counts, 0) - counts + torch.cumsum(mask, 0) - mask, -1)
    token, expert = routing_map.nonzero(as_tuple=True)
    return hidden.new_zeros(rows, hidden.size(1)).index_put((dest[token, expert],), hidden[token]), dest


def _te_unpermute(rows: torch.Tensor, dest: torch.Tensor, probs: torch.Tensor, num_tokens: int,
                  pad_offsets: Optional[torch.Tensor]) -> torch.Tensor:
    """TE's weighted unpermute on the CPU: each token's rows times its routing weights, summed in fp32."""
    token, expert = (dest >= 0).nonzero(as_tuple=True)
    weighted = rows[dest[token, expert]].float() * probs[token, expert, None]
    return torch.zeros(num_tokens, rows.size(1)).index_add(0, token, weighted).to(rows.dtype)


def _fused_kernels(monkeypatch: pytest.MonkeyPatch) -> list[te_routing.FusedRouting]:
    """Route through :mod:`.te_routing` with the CPU stand-ins; returns the routings made."""
    made: list[te_routing.FusedRouting] = []
    original = te_routing.fused_routing

    def spy(*args: Any, **kwargs: Any) -> Optional[te_routing.FusedRouting]:
        route = original(*args, **kwargs)
        if route is not None:
            made.append(route)
        return route

    monkeypatch.setattr(experts_module, "fused_permutation_available", lambda: True)
    monkeypatch.setattr(experts_module, "fused_routing", spy)
    monkeypatch.setattr(te_routing, "te_permute", _te_permute)
    monkeypatch.setattr(te_routing, "te_unpermute", _te_unpermute)
    return made


@pytest.mark.parametrize("native", [False, True], ids=["host-splits", "no-host-sync"])
def test_fused_routing_computes_the_same_function(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """TE's fused routing (stand-in kernels), split path with host split sizes and native path without a host
    sync (upper-bound buffer, slack rows in the last expert's block), with dropped slots and a token that names
    one expert twice: the torch backend's function, outputs and every gradient. On the native path the
    down-projection bias is added after the combine, not by TE (its bias pass there costs more)."""
    ref, te = _pair(monkeypatch, "fp8_current")
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: native)
    made = _fused_kernels(monkeypatch)
    x, index, weights = _routing()
    index[3] = torch.tensor([1, 1])
    SPLITS.clear()
    CALLS.clear()
    want, got = _step(ref, x, index, weights), _step(te, x, index, weights)
    assert [with_bias for _, with_bias in CALLS] == [True, not native]
    errors = {n: rel_err(got[n], want[n]) for n in want}
    assert max(errors.values()) <= 1e-5, errors
    assert len(made) == 1 and (made[0].splits is None) == native
    rows = te_routing.upper_bound_rows(13, 2, 8, 16) if native else made[0].rows
    assert [(n, sum(s)) for n, s in SPLITS] == [(native, rows), (native, rows)]
    assert all(s % 16 == 0 for _, splits in SPLITS for s in splits)


@pytest.mark.parametrize("native", [False, True], ids=["split-path", "native-grouped"])
def test_native_grouped_gemm_gets_device_splits(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Where TE says its native grouped GEMM runs, the engine is built for it and reads the padded split sizes
    from a device tensor; elsewhere the host list goes to TE's split path. Same function either way."""
    ref, te = _pair(monkeypatch, "fp8_current")
    monkeypatch.setattr(experts_module, "native_grouped_gemm", lambda recipe, dtype: native)
    x, index, weights = _routing()
    SPLITS.clear()
    want, got = _step(ref, x, index, weights), _step(te, x, index, weights)
    assert all(rel_err(got[n], want[n]) <= 1e-5 for n in want)
    assert [n for n, _ in SPLITS] == [native, native]
    assert all(engine.native == native for engine in te._engines.values())
    expected = make_dispatch(index, 8, 16).splits
    assert all(splits == expected and all(s % 16 == 0 for s in splits) for _, splits in SPLITS)


def test_frozen_weights_keep_the_outside_bias_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen weights with trainable biases: the engine gets no bias (TE 2.20 would drop its gradient)."""
    ref, te = _pair(monkeypatch)
    for module in (ref, te):
        module.fc1.weight.requires_grad_(False)
        module.fc2.weight.requires_grad_(False)
    x, index, weights = _routing()
    CALLS.clear()
    want, got = _step(ref, x, index, weights), _step(te, x, index, weights)
    assert [with_bias for _, with_bias in CALLS] == [False, False]
    assert got["fc1.weight"] is None and got["fc2.weight"] is None
    for name in ("out", "x", "weights", "fc1.bias", "fc2.bias"):
        assert got[name] is not None and got[name].abs().sum() > 0, name
        assert rel_err(got[name], want[name]) <= 1e-5, name


def test_which_biases_te_may_apply() -> None:
    w, b = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    trainable_w, trainable_b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    assert not te_applies_bias(trainable_w, None)
    assert te_applies_bias(trainable_w, trainable_b)
    assert te_applies_bias(trainable_w, b)
    assert te_applies_bias(w, b)  # nothing trainable: no gradient to lose
    assert not te_applies_bias(w, trainable_b)  # TE would drop this bias gradient
    with torch.no_grad():
        assert te_applies_bias(w, trainable_b)  # no gradients asked for at all
