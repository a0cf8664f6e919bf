"""The norm swap on the CPU: which RMSNorms go to TE's fused kernels (GPT-OSS's, whose math the kernel is) and which
stay (Llama's form), reversibility and state dicts, the plugin's wiring, and the kernel wrapper's dtype handling
through the TE stand-in (``te_standin.py``: TE's registered dtype combinations). The kernels themselves run in
``tests/gpu/test_norms_gpu.py``."""

from __future__ import annotations

import pytest
import te_standin
import torch
from experts_helpers import tiny_model

from lightning_te_moe import TEMoEPrecision
from lightning_te_moe.norms import (ONE_ROUNDING, NormSwapConfig, TERMSNorm, plan_reason, swap_norms, te_rmsnorm,
                                    unswap_norms)
from lightning_te_moe.policy import Environment, PrecisionRequest, make_plan


def _gpt_oss_norm(hidden: int = 32, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    norm = GptOssRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(1))
    return norm.to(dtype)


def test_gpt_oss_norms_are_swapped_and_come_back() -> None:
    model = tiny_model("gpt_oss", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {p: m for p, m in model.named_modules() if type(m).__name__ == "GptOssRMSNorm"}
    weights = {p: m.weight for p, m in originals.items()}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits

    report = swap_norms(model)

    assert len(originals) == 5  # input and post-attention norm per layer, and the final norm
    assert sorted(e.path for e in report.by_status("swapped")) == sorted(originals)
    assert report.summary().startswith("swapped 5 RMSNorm module(s) of GptOssForCausalLM")
    for path, weight in weights.items():
        swapped = model.get_submodule(path)
        assert isinstance(swapped, TERMSNorm) and swapped.weight is weight
    assert model.state_dict().keys() == before.keys()  # the same keys: checkpoints load into either
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)  # CPU: the model's own math
    again = swap_norms(model)
    assert len(again.by_status("already swapped")) == 5 and not again.by_status("swapped")

    assert unswap_norms(model) == 5
    for path, original in originals.items():
        assert model.get_submodule(path) is original and original.weight is weights[path]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_llama_form_norms_stay_with_the_reason(arch: str) -> None:
    model = tiny_model(arch, layers=2)
    report = swap_norms(model)
    assert not report.by_status("swapped") and report.by_status("kept")
    assert all("rounds the normalized input to the input dtype before multiplying" in e.reason
               for e in report.entries)
    assert not any(isinstance(m, TERMSNorm) for m in model.modules())
    assert "nothing changed" in report.summary()


def test_module_filter_keeps_the_norms_it_rejects() -> None:
    model = tiny_model("gpt_oss", layers=2)
    report = swap_norms(model, NormSwapConfig(module_filter=lambda module, fqn: fqn != "model.norm"))
    kept = report.by_status("kept")
    assert [e.path for e in kept] == ["model.norm"] and kept[0].reason == "excluded by module_filter"
    assert len(report.by_status("swapped")) == 4 and type(model.model.norm).__name__ == "GptOssRMSNorm"


def test_the_table_names_only_gpt_oss() -> None:
    assert list(ONE_ROUNDING) == ["GptOssRMSNorm"]


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_the_kernel_wrapper_keeps_gpt_oss_dtypes(monkeypatch: pytest.MonkeyPatch, x_dtype: torch.dtype,
                                                 w_dtype: torch.dtype) -> None:
    """Output in the input's dtype, gradients in the input's and the weight's; the operands reach TE's kernel in a
    combination it registers (the stand-in asserts it); values as GPT-OSS's own norm computes them."""
    te_standin.install(monkeypatch)
    reference = _gpt_oss_norm(dtype=w_dtype)
    weight = torch.nn.Parameter(reference.weight.detach().clone())
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    grad = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    x_ref, x_te = x.clone().requires_grad_(), x.clone().requires_grad_()

    expected = reference(x_ref)
    out = te_rmsnorm(x_te, weight, 1e-5)
    expected.backward(grad)
    out.backward(grad)

    assert out.dtype == expected.dtype == x_dtype and out.shape == x.shape
    assert x_te.grad.dtype == x_dtype and weight.grad.dtype == w_dtype
    tol = dict(rtol=1.6e-2, atol=1e-2) if torch.bfloat16 in (x_dtype, w_dtype) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(x_te.grad, x_ref.grad, **tol)
    torch.testing.assert_close(weight.grad, reference.weight.grad, **tol)


def test_a_frozen_weight_gets_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    te_standin.install(monkeypatch)
    weight = torch.ones(32, dtype=torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    te_rmsnorm(x, weight, 1e-5).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and weight.grad is None


def _env(device: str, has_te: bool) -> Environment:
    return Environment(device_type=device, compute_capability=(9, 0) if device == "cuda" else None,
                       te_version="2.20.2" if has_te else None)


def test_the_run_decides_where_norms_may_swap() -> None:
    cpu = make_plan(_env("cpu", False), PrecisionRequest())
    assert plan_reason(cpu) == "device is cpu: norms stay the model's own (TE's kernels need a GPU)"
    no_te = make_plan(_env("cuda", False), PrecisionRequest())
    assert plan_reason(no_te) == "Transformer Engine is not installed: norms stay the model's own"
    compiled = make_plan(_env("cuda", True), PrecisionRequest(torch_compile=True))
    assert plan_reason(compiled).startswith("the model runs under torch.compile, which fuses its RMSNorm itself")


def test_the_plugin_leaves_norms_alone_on_the_cpu(capsys: pytest.CaptureFixture) -> None:
    model = tiny_model("gpt_oss", layers=2)
    plugin = TEMoEPrecision(print_plan=False, guard=False)
    plugin.convert_module(model)
    assert not any(isinstance(m, TERMSNorm) for m in model.modules())
    assert "norm swap: norms of GptOssForCausalLM not swapped: device is cpu" in capsys.readouterr().out
    assert not any("RMSNorm" in d.reason for d in plugin.decisions.decisions)


def test_swap_norms_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="swap_norms"):
        TEMoEPrecision(swap_norms="yes")
