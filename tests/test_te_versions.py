"""The TE versions the package needs: the declared floor matches what the code calls, and the newer APIs fall back
on an older TE (stand-in TE modules with the older APIs; no TE runs here) with a plan line where the plan changes."""

from __future__ import annotations

import importlib.machinery
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from packaging.version import Version
from torch import nn

from lightning_te_moe import Environment, PrecisionRequest, make_plan
from lightning_te_moe.experts import activations, gemm, te_routing
from lightning_te_moe.policy import environment, te_features
from lightning_te_moe.policy.te_features import TE_FEATURES, TE_FLOOR, since, te_has

ROOT = Path(__file__).resolve().parents[1]


def _clear_caches() -> None:
    for cached in (te_has, gemm.te_available, te_routing.fused_permutation_available):
        cached.cache_clear()
    gemm._NATIVE.clear()


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class _GroupedLinear216(nn.Module):
    """TE 2.16's ``GroupedLinear`` constructor: no ``use_grouped_tensor``."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, params_dtype: Any = None) -> None:
        super().__init__()
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(out_features, in_features)))
            self.register_parameter(f"bias{i}", nn.Parameter(torch.empty(out_features if bias else 0)))


class _GroupedLinear220(_GroupedLinear216):
    """TE 2.20's: ``use_grouped_tensor`` picks the native grouped GEMM."""

    def __init__(self, *args: Any, use_grouped_tensor: Optional[bool] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.use_grouped_tensor = use_grouped_tensor


def _gptoss(h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


def _dgptoss(grad: torch.Tensor, h: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    with torch.enable_grad():  # called from inside a backward
        h = h.detach().requires_grad_(True)
        _gptoss(h, limit, alpha).backward(grad)
    return h.grad


CALLS: list[tuple[str, int]] = []


def _tex(version: str) -> types.ModuleType:
    """``transformer_engine_torch`` as of ``version``: the clamped SwiGLU with or without its offset argument."""
    if Version(version) >= Version("2.17"):
        def fwd(h: torch.Tensor, q: Any, limit: float, alpha: float, offset: float) -> torch.Tensor:
            CALLS.append(("clamped_swiglu", 5))
            assert offset == 1.0
            return _gptoss(h, limit, alpha)

        def bwd(g: torch.Tensor, h: torch.Tensor, q: Any, limit: float, alpha: float, offset: float) -> torch.Tensor:
            CALLS.append(("clamped_dswiglu", 6))
            return _dgptoss(g, h, limit, alpha)
    else:
        def fwd(h: torch.Tensor, q: Any, limit: float, alpha: float) -> torch.Tensor:  # adds GPT-OSS's +1 itself
            CALLS.append(("clamped_swiglu", 4))
            return _gptoss(h, limit, alpha)

        def bwd(g: torch.Tensor, h: torch.Tensor, q: Any, limit: float, alpha: float) -> torch.Tensor:
            CALLS.append(("clamped_dswiglu", 5))
            return _dgptoss(g, h, limit, alpha)
    return _module("transformer_engine_torch", clamped_swiglu=fwd, clamped_dswiglu=bwd,
                   get_cublasLt_version=lambda: 130100)


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in TE of a given version (its modules carry only the APIs that version has)."""

    def install(version: str, predicate: Optional[Any] = None) -> None:
        old = Version(version) < Version("2.9")

        def check(return_reason: bool = False) -> Any:
            assert not old, "TE < 2.9 has no return_reason"
            return (True, "") if return_reason else True

        def old_check() -> bool:
            return True

        pytorch = _module("transformer_engine.pytorch",
                          GroupedLinear=_GroupedLinear220 if Version(version) >= Version("2.17") else _GroupedLinear216,
                          get_cudnn_version=lambda: (9, 14, 0),
                          **{fn: old_check if old else check for fn in environment.TE_CHECKS.values()})
        grouped = _module("transformer_engine.pytorch.module.grouped_linear")
        if predicate is not None:
            grouped.is_module_grouped_tensor_path_supported = predicate
        modules = {"transformer_engine": _module("transformer_engine", __version__=version, pytorch=pytorch),
                   "transformer_engine.pytorch": pytorch,
                   "transformer_engine.pytorch.permutation": _module("transformer_engine.pytorch.permutation"),
                   "transformer_engine.pytorch.module": _module("transformer_engine.pytorch.module"),
                   "transformer_engine.pytorch.module.grouped_linear": grouped,
                   "transformer_engine_torch": _tex(version)}
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(te_features, "te_installed_version", lambda: version)
        _clear_caches()

    yield install
    _clear_caches()


def test_declared_floor_is_what_the_code_requires() -> None:
    te_extra = re.search(r"^te = (.*)$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert te_extra is not None and te_extra.group(1) == f'["transformer-engine[pytorch]>={TE_FLOOR}"]'
    assert TE_FLOOR == "2.9"  # te.autocast and the quantization module: every forward needs them
    assert {f.name for f in TE_FEATURES if f.fallback is None} == {"autocast", "availability_reasons"}
    with pytest.raises(ValueError, match="unknown TE feature 'warp_drive'"):
        since("warp_drive")


@pytest.mark.parametrize(("version", "has"), [("2.8.0", set()), ("2.9.0", {"autocast", "availability_reasons"}),
                                              ("2.16.1", {"fused_permute", "backward_override"}),
                                              ("2.20.0.dev0", {"native_grouped_predicate", "use_grouped_tensor"}),
                                              (None, set())])
def test_te_has_follows_the_installed_version(monkeypatch: pytest.MonkeyPatch, version: Optional[str],
                                              has: set[str]) -> None:
    monkeypatch.setattr(te_features, "te_installed_version", lambda: version)
    te_has.cache_clear()
    try:
        assert {f.name for f in TE_FEATURES if te_has(f.name)} >= has
        if version is None or Version(version) < Version("2.9"):
            assert not any(te_has(f.name) for f in TE_FEATURES if f.name != "softmax_type")
    finally:
        te_has.cache_clear()


@pytest.mark.parametrize(("version", "args"), [("2.16.1", (4, 5)), ("2.20.2", (5, 6))])
def test_clamped_swiglu_on_older_and_newer_te(fake_te: Any, version: str, args: tuple[int, int]) -> None:
    """TE 2.9-2.16's clamped SwiGLU has no offset argument (it adds 1 itself): the same GPT-OSS function either way."""
    fake_te(version)
    act = activations.ClampedSwiGLU(alpha=1.702, limit=7.0)
    h = (torch.randn(5, 8) * 4).requires_grad_(True)
    ref = h.detach().clone().requires_grad_(True)
    CALLS.clear()
    act(h, fused=True).square().sum().backward()
    act(ref).square().sum().backward()
    assert CALLS == [("clamped_swiglu", args[0]), ("clamped_dswiglu", args[1])]
    assert torch.allclose(h.grad, ref.grad)


@pytest.mark.parametrize("version", ["2.16.1", "2.20.2"])
def test_grouped_linear_built_without_use_grouped_tensor_before_te_2_17(fake_te: Any, version: str) -> None:
    fake_te(version)
    engine = gemm.TEGroupedGemm(4, 8, 16, torch.device("cpu"), torch.float32, bias=True)
    assert "use_grouped_tensor" not in inspect.signature(_GroupedLinear216.__init__).parameters
    assert getattr(engine.module, "use_grouped_tensor", "absent") == ("absent" if version == "2.16.1" else False)
    assert not list(engine.module.parameters())  # the engine computes over the caller's parameters


def test_native_grouped_gemm_needs_tes_predicate(fake_te: Any) -> None:
    """TE < 2.19 has no is_module_grouped_tensor_path_supported: TE's split path, whatever the cuBLASLt."""
    fake_te("2.18.0")
    assert gemm.native_grouped_gemm(None, torch.bfloat16) is False
    fake_te("2.20.2", predicate=lambda recipe, dtype: dtype == torch.bfloat16)
    assert gemm.native_grouped_gemm(None, torch.bfloat16) is True
    assert gemm.native_grouped_gemm(None, torch.float32) is False


def test_fused_permutation_needs_te_2_15(fake_te: Any) -> None:
    """TE < 2.15 registers no te_moe mask-map ops: the experts route with torch gathers."""
    fake_te("2.14.1")
    assert gemm.te_available() and not te_routing.fused_permutation_available()


@pytest.mark.parametrize(("version", "available"), [("2.8.0", False), ("2.9.0", True)])
def test_te_below_the_floor_counts_as_absent(fake_te: Any, version: str, available: bool) -> None:
    fake_te(version)
    assert gemm.te_available() is available
    checks, cublaslt, cudnn = environment._te_facts()  # TE 2.8's checks take no return_reason: not asked
    assert bool(checks) is available and cublaslt == "13.1.0" and cudnn == "9.14.0"


@pytest.mark.parametrize(("cc", "te", "request_args", "line"), [
    ("9.0", "2.8.0", {}, "te-below-floor"),
    ("9.0", "2.14.1", {}, "backward-override-needs-2.15"),
    ("9.0", "2.14.1", {}, "te-no-fused-permute"),
    ("9.0", "2.18.0", {}, "te-no-native-grouped"),
    ("10.0", "2.16.1", {"auto_nvfp4": True}, "experts-no-nvfp4-grouped"),
])
def test_older_te_gives_a_plan_line(cc: str, te: str, request_args: dict[str, Any], line: str) -> None:
    plan = make_plan(Environment.assume(cc=cc, te=te, cublaslt="13.10.0"), PrecisionRequest(**request_args))
    assert line in {r.rule for r in plan.reasons}
    newer = make_plan(Environment.assume(cc=cc, te="2.20.2", cublaslt="13.10.0"), PrecisionRequest(**request_args))
    assert line not in {r.rule for r in newer.reasons}


def test_te_below_the_floor_plans_like_no_te() -> None:
    plan = make_plan(Environment.assume(cc="9.0", te="2.8.0"))
    assert plan.summary() == "bf16" and not plan.fused_attention
    assert "Upgrade Transformer Engine" in next(r.text for r in plan.reasons if r.rule == "te-below-floor")
