"""GPU tests run on a CUDA machine with Transformer Engine (the H100 through the device tool); skipped elsewhere."""

import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def te_gemms_for_bf16(request, monkeypatch):
    """The GPU tests check TE's GEMM paths (split and native): BF16 experts stay on them at every size unless a test
    is marked ``grouped_mm`` (the fine-tuning-size path on torch's grouped_mm has its own tests)."""
    if request.node.get_closest_marker("grouped_mm") is None and importlib.util.find_spec("transformer_engine"):
        from lightning_te_moe.experts import module as experts_module

        monkeypatch.setattr(experts_module, "prefer_grouped_mm", lambda tokens, recipe, native: False)


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA device"
    elif importlib.util.find_spec("transformer_engine") is None:
        reason = "needs Transformer Engine"
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
