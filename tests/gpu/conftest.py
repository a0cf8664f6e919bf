"""GPU tests run on a CUDA machine with Transformer Engine (the H100 through the device tool); skipped elsewhere."""

import importlib.util

import pytest
import torch


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
