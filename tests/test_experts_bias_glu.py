"""The fused up-projection bias + GLU kernel (experts/bias_glu.py): on the CPU in Triton's interpreter (tests/conftest.py
chooses it), compiled where there is a GPU (tests/gpu also run it inside the expert layer on TE's native path).

Its math is checked against the activation modules' own forward and autograd: output, input gradient and the
per-expert bias gradient, with rows of several experts, an empty expert, padding rows and the clamp boundaries.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lightning_te_moe.experts import bias_glu as bg
from lightning_te_moe.experts.activations import GLU, ClampedSwiGLU, glu_params

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    pytest.importorskip("numpy")  # Triton's interpreter runs on numpy
    if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it on a machine without CUDA
        pytest.skip("Triton kernels run on the CPU only in its interpreter (TRITON_INTERPRET=1 before Triton imports)",
                    allow_module_level=True)


def _case(width: int, splits: list[int], dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(splits)
    h = (torch.randn(rows, 2 * width, generator=gen) * 6).to(dtype)  # reaches past GPT-OSS's limit of 7
    bias = torch.randn(len(splits), 2 * width, generator=gen).to(dtype)
    grad = torch.randn(rows, width, generator=gen).to(dtype)
    return h.to(DEVICE), bias.to(DEVICE), torch.tensor(splits, device=DEVICE), grad.to(DEVICE)


def _reference(activation: nn.Module, h, bias, splits, grad):
    h = h.detach().cpu().double().requires_grad_()
    b = bias.detach().cpu().double().requires_grad_()
    splits, grad = splits.cpu(), grad.cpu()
    expert = torch.repeat_interleave(torch.arange(len(splits)), splits)
    out = activation(h + b[expert])
    out.backward(grad.double())
    return out.detach(), h.grad, b.grad


@pytest.mark.parametrize("activation", [ClampedSwiGLU(alpha=1.702, limit=7.0), GLU(nn.SiLU())],
                         ids=["clamped_swiglu", "swiglu"])
def test_kernel_matches_the_activation_on_biased_rows(activation: nn.Module) -> None:
    # 300 columns a half: full and partial column blocks; experts of 33 (more than one row tile, unaligned) and 7
    # rows; expert 1 has no rows; the last one holds more rows than its programs' first tiles.
    h, bias, splits, grad = _case(300, [33, 0, 7, 150])
    h.requires_grad_()
    bias.requires_grad_()
    out = bg.bias_glu(h, bias, splits, glu_params(activation))
    out.backward(grad)
    ref_out, ref_dh, ref_db = _reference(activation, h, bias, splits, grad)
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.cpu().double(), ref_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.cpu().double(), ref_db, rtol=1e-4, atol=1e-4)
    assert bias.grad[1].abs().max() == 0  # an expert without rows gets no bias gradient


def test_clamps_pass_gradients_as_te_does() -> None:
    # TE's clamped_dswiglu: the gate's gradient passes where gate <= limit, the up half's where |up| <= limit.
    limit = 7.0
    gate = torch.tensor([6.0, 7.0, 8.0, -9.0] * 4).repeat(16, 1)
    up = torch.tensor([6.0, 7.0, 8.0, -9.0, -7.0, 0.5, 7.5, -7.5] * 2).repeat(16, 1)
    h = torch.cat([gate, up], dim=1).to(DEVICE).requires_grad_()
    bias = torch.zeros(1, 32, device=DEVICE, requires_grad=True)
    act = ClampedSwiGLU(alpha=1.702, limit=limit)
    out = bg.bias_glu(h, bias, torch.tensor([16], device=DEVICE), glu_params(act))
    out.sum().backward()
    dgate, dup = h.grad[0, :16].cpu(), h.grad[0, 16:].cpu()
    assert (dgate[gate[0] > limit] == 0).all() and (dgate[gate[0] <= limit] != 0).all()
    assert (dup[up[0].abs() > limit] == 0).all() and (dup[up[0].abs() <= limit] != 0).all()


def test_padding_rows_reach_no_bias_gradient() -> None:
    # Padding rows hold zeros; their output gradient is zero (no token reads them back), so the bias gradient is
    # that of the real rows alone.
    h, bias, splits, grad = _case(64, [16, 16])
    h[8:16] = 0
    grad[8:16] = 0
    bias.requires_grad_()
    out = bg.bias_glu(h, bias, splits, glu_params(ClampedSwiGLU(1.702, 7.0)))
    out.backward(grad)
    _, _, ref_db = _reference(ClampedSwiGLU(1.702, 7.0), h[:8], bias[:1], torch.tensor([8]), grad[:8])
    torch.testing.assert_close(bias.grad[0].cpu().double(), ref_db[0], rtol=1e-4, atol=1e-4)


def test_bf16_rounds_once() -> None:
    h, bias, splits, grad = _case(128, [16, 32], dtype=torch.bfloat16, seed=3)
    h.requires_grad_()
    bias.requires_grad_()
    act = ClampedSwiGLU(1.702, 7.0)
    out = bg.bias_glu(h, bias, splits, glu_params(act))
    out.backward(grad)
    ref_out, ref_dh, ref_db = _reference(act, h, bias, splits, grad)
    assert out.dtype == h.grad.dtype == bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(h.grad.cpu().double(), ref_dh, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(bias.grad.cpu().double(), ref_db, rtol=1e-2, atol=5e-2)


def test_frozen_bias_gets_no_gradient_and_frozen_input_none() -> None:
    h, bias, splits, grad = _case(32, [16])
    h.requires_grad_()
    out = bg.bias_glu(h, bias, splits, glu_params(GLU(nn.SiLU())))
    out.backward(grad)
    assert bias.grad is None and h.grad is not None
    h2, bias2, _, _ = _case(32, [16])
    bias2.requires_grad_()
    bg.bias_glu(h2, bias2, splits, glu_params(GLU(nn.SiLU()))).sum().backward()
    assert h2.grad is None and bias2.grad is not None


def test_refusals() -> None:
    params = glu_params(GLU(nn.SiLU()))
    assert not bg.fused_bias_glu_runs(torch.zeros(1), params)  # a CPU input: TE or the torch routing adds the bias
    with pytest.raises(ValueError, match=r"bias \[E, 2I\]"):
        bg.bias_glu(torch.zeros(16, 8), torch.zeros(2, 8), torch.tensor([16]), params)
    with pytest.raises(ValueError, match=r"h \[rows, 2I\]"):
        bg.bias_glu(torch.zeros(16, 7), torch.zeros(1, 7), torch.tensor([16]), params)


def test_deterministic_mode_keeps_the_bias_out_of_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    params = glu_params(GLU(nn.SiLU()))
    x = torch.zeros(1)
    monkeypatch.setattr(x.__class__, "is_cuda", property(lambda self: True))
    assert bg.fused_bias_glu_runs(x, params)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not bg.fused_bias_glu_runs(x, params)
    assert not bg.fused_bias_glu_runs(x, None)


def test_only_silu_glu_and_clamped_swiglu_have_params() -> None:
    assert glu_params(GLU(nn.GELU())) is None
    assert glu_params(nn.Identity()) is None
    assert glu_params(ClampedSwiGLU(1.702, 7.0)) == bg.GLUParams(7.0, 1.702, 1.0)
    assert glu_params(GLU(nn.SiLU())) == bg.GLUParams(None, 1.0, 0.0)
