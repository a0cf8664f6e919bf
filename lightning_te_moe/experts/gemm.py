"""The two grouped-GEMM backends: TE ``GroupedLinear`` (CUDA) and a torch reference with the same math.

Both take rows already sorted and padded by expert, weights ``[E, out, in]`` (the TE/nn.Linear layout) and
optional biases ``[E, out]``; both return ``[rows, out]``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import Dispatch


@lru_cache(maxsize=1)
def te_available() -> bool:
    """Transformer Engine's PyTorch API imports (looked up lazily: the package works without TE)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a torch-autocast region would run a linear layer in (grouped_mm is not autocast-aware)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_ok(x: Tensor, weight: Tensor) -> bool:
    """torch's fused grouped GEMM runs here (CUDA, BF16, 16-byte aligned dims); CPU's lacks a robust backward."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and weight.size(1) % 8 == 0 and weight.size(2) % 8 == 0)


def torch_grouped_linear(x: Tensor, weight: Tensor, dispatch: Dispatch) -> Tensor:
    """Reference grouped GEMM ``x @ weight[e].T`` per expert block: ``grouped_mm`` where it runs, else a loop."""
    weight = weight.to(x.dtype)
    if _grouped_mm_ok(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=dispatch.offsets)
    splits = dispatch.splits
    parts = [F.linear(chunk, weight[e]) for e, chunk in enumerate(x.split(splits)) if splits[e]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.size(1))


class TEGroupedGemm:
    """A TE ``GroupedLinear`` used as a compute engine over *our* parameters.

    Its own per-expert weights are removed at build time; each call binds views of the caller's stacked
    ``[E, out, in]`` weight (``unbind``: one stack in backward) as ``weight{i}``. So the
    optimizer, DDP and checkpoints only ever see the swapped module's plain parameters, and the engine can be
    built lazily on the first CUDA forward (the swap itself runs before the model moves to the GPU).
    """

    def __init__(self, num_gemms: int, in_features: int, out_features: int, device: torch.device,
                 params_dtype: torch.dtype) -> None:
        import transformer_engine.pytorch as te

        self.num_gemms = num_gemms
        self.module: Any = te.GroupedLinear(num_gemms, in_features, out_features, bias=False, device=device,
                                            params_dtype=params_dtype)
        for i in range(num_gemms):
            del self.module._parameters[f"weight{i}"]

    def __call__(self, x: Tensor, weight: Tensor, splits: list[int]) -> Tensor:
        names = self.module.__dict__
        for i, w in enumerate(weight.unbind(0)):
            names[f"weight{i}"] = w
        try:
            return self.module(x, splits)
        finally:
            for i in range(self.num_gemms):
                names.pop(f"weight{i}", None)
