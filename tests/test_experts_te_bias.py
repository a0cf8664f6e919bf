"""Biases on the TE path: TE's GEMM epilogue adds them (trainable weights), the outside path stays for frozen weights.

TE does not run on the CPU, so a stand-in engine with TE's contract (``y_e = x_e @ w_e.T + b_e``, gradients by
autograd) takes the place of ``TEGroupedGemm``; the swapped module must then compute exactly what its torch
backend (biases outside the GEMMs) computes: outputs and every gradient. For the fused routing, stand-ins with the
row map format and placement rule of TE's permute/unpermute kernels (checked against the torch dispatch in
``test_experts_fused_routing.py``) take the place of TE's Triton kernels; they leave the rows no token names as NaN,
as TE's leave them uninitialised, so only the module's own zeroing of the padding rows (a Triton kernel, here in
Triton's interpreter) keeps them out of the result.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from experts_helpers import precision_state, rel_err, te_row_id_map_on_cpu, tiny_model

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


def _entries(row_id_map: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (token, its destination row, that row's expert) the map holds."""
    routed = row_id_map[:, -1].long()
    token, j = (torch.arange(num_experts) < routed[:, None]).nonzero(as_tuple=True)
    return token, row_id_map[token, j].long(), row_id_map[token, num_experts + j].long()


def _te_permute(hidden: torch.Tensor, row_id_map: torch.Tensor, num_experts: int, rows: int) -> torch.Tensor:
    """TE's permute kernel on the CPU: each token to its destination rows; every other row is left as the memory
    was (NaN here: a padding row the caller does not zero poisons the result)."""
    token, dest, _ = _entries(row_id_map, num_experts)
    return torch.full((rows, hidden.size(1)), float("nan"), dtype=hidden.dtype).index_put((dest,), hidden[token])


def _te_gather(rows: torch.Tensor, row_id_map: torch.Tensor, num_experts: int, num_tokens: int) -> torch.Tensor:
    token, dest, _ = _entries(row_id_map, num_experts)
    return torch.zeros(num_tokens, rows.size(1), dtype=rows.dtype).index_add(0, token, rows[dest])


class _Unpermute(torch.autograd.Function):
    """TE's weighted unpermute on the CPU (fp32 sum); its backward leaves the rows no token reads as NaN, as TE's
    leaves them uninitialised without ``pad_offsets``."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor,
                num_tokens: int) -> torch.Tensor:
        token, dest, expert = _entries(row_id_map, probs.size(1))
        ctx.save_for_backward(rows, token, dest, expert, probs)
        weighted = rows[dest].float() * probs[token, expert, None]
        return torch.zeros(num_tokens, rows.size(1)).index_add(0, token, weighted).to(rows.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        rows, token, dest, expert, probs = ctx.saved_tensors
        grad_rows = torch.full_like(rows, float("nan"))
        grad_rows[dest] = (grad[token].float() * probs[token, expert, None]).to(rows.dtype)
        grad_probs = torch.zeros_like(probs)
        grad_probs[token, expert] = (grad[token].float() * rows[dest].float()).sum(1)
        return grad_rows, None, grad_probs, None


def _te_unpermute(rows: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor,
                  num_tokens: int) -> torch.Tensor:
    return _Unpermute.apply(rows, row_id_map, probs, num_tokens)


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
    monkeypatch.setattr(te_routing, "te_row_id_map", te_row_id_map_on_cpu)
    monkeypatch.setattr(te_routing, "te_permute", _te_permute)
    monkeypatch.setattr(te_routing, "te_gather", _te_gather)
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
    assert all(e <= 1e-5 for e in errors.values()), errors  # NaN fails too (max() would skip it)
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
