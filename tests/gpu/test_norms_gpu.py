"""RMSNorm on TE's fused kernels on a GPU: the same values and gradients as GPT-OSS's own norm (BF16 and FP32
weights, GPT-OSS's width and a small one, a row count TE's tuned kernels do not take), inside a CUDA graph, and a
plugin fit of a tiny GPT-OSS whose norms were swapped."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
    pytest.skip("needs CUDA and Transformer Engine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experts_helpers import gpu_fit, tiny_model  # noqa: E402

from lightning_te_moe.norms import TERMSNorm  # noqa: E402

BF16_ULP = 2.0**-7  # one unit in the last place of a BF16 value in [1, 2)


def _norm(hidden: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    norm = GptOssRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(0))
    return norm.to("cuda", dtype)


@pytest.mark.parametrize("hidden", [2880, 96])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_te_norm_matches_gpt_oss(hidden: int, w_dtype: torch.dtype) -> None:
    reference = _norm(hidden, w_dtype)
    swapped = TERMSNorm(_norm(hidden, w_dtype))
    x = (torch.randn(3, 341, hidden, device="cuda") * 3).to(torch.bfloat16)
    grad = torch.randn(3, 341, hidden, device="cuda").to(torch.bfloat16)
    x_ref, x_te = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, out = reference(x_ref), swapped(x_te)
    expected.backward(grad)
    out.backward(grad)

    assert out.dtype == torch.bfloat16 and swapped.weight.grad.dtype == w_dtype
    # one rounding of an FP32 value both ways: at most one BF16 step apart, and almost always equal
    diff = (out.float() - expected.float()).abs()
    assert bool((diff <= BF16_ULP * expected.float().abs().clamp_min(1e-3)).all())
    assert float((out == expected).float().mean()) > 0.99
    torch.testing.assert_close(x_te.grad, x_ref.grad, rtol=BF16_ULP, atol=1e-3)
    torch.testing.assert_close(swapped.weight.grad, reference.weight.grad, rtol=1e-2, atol=1e-1)


def test_te_norm_replays_in_a_cuda_graph() -> None:
    norm = TERMSNorm(_norm(2880, torch.bfloat16))
    x = torch.randn(512, 2880, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(512, 2880, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch asks
        norm(x).backward(grad)
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = norm.weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = norm(x)
        out.backward(grad)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    eager = TERMSNorm(_norm(2880, torch.bfloat16))
    x_eager = x.detach().clone().requires_grad_()
    expected = eager(x_eager)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


def test_a_fit_runs_on_swapped_norms(tmp_path: Path) -> None:
    sizes = dict(hidden=256, intermediate=256, experts=2, top_k=2, layers=2)
    plugin, module = gpu_fit(tiny_model("gpt_oss", **sizes), tmp_path, steps=30, print_plan=False)
    swaps = [d.reason for d in plugin.decisions.decisions if d.kind == "swap"]
    assert any(s.startswith("swapped 5 RMSNorm module(s) of Tiny") for s in swaps), swaps  # Tiny: the LightningModule
    assert sum(isinstance(m, TERMSNorm) for m in module.model.modules()) == 5
    print("plan:", plugin.plan.summary(), "losses:", [round(v, 3) for v in module.losses[::5]])
    assert all(math.isfinite(v) for v in module.losses)
    assert sum(module.losses[-5:]) / 5 < 0.7 * sum(module.losses[:5]) / 5
