"""TE ``te.Linear`` as a compute engine over a dense layer's own parameters, and what its quantized GEMMs need.

Every TE name the dense swap uses is here (imported lazily: the package works without TE).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..experts.gemm import te_available
from ..experts.weight_cache import QuantizedWeightCache

#: The multiple TE's quantized GEMMs need in both weight dimensions, by TE recipe class: FP8 rows of 16 bytes
#: (16 values; TE ``utils.assert_dim_for_fp8_exec``), whole 32-value scaling blocks for MXFP8
#: (``constants.MXFP8_BLOCK_SCALING_SIZE``), 16-byte rows of packed FP4 for NVFP4 (32 values).
DIM_MULTIPLE: dict[str, int] = {"DelayedScaling": 16, "Float8CurrentScaling": 16, "Float8BlockScaling": 16,
                                "MXFP8BlockScaling": 32, "NVFP4BlockScaling": 32}
#: For a recipe class not in the table (TE's ``CustomRecipe``): the largest row alignment TE uses for any recipe.
UNKNOWN_DIM_MULTIPLE = 128


def te_runs(x: Tensor) -> bool:
    """TE can run a GEMM on ``x`` here: a CUDA tensor and a Transformer Engine that imports."""
    return x.is_cuda and te_available()


def dim_multiple(recipe: Any) -> int:
    """The multiple both weight dimensions must be for TE to run ``recipe``'s quantized GEMMs."""
    return DIM_MULTIPLE.get(type(recipe).__name__, UNKNOWN_DIM_MULTIPLE)


def row_alignment(recipe: Any) -> int:
    """Rows (tokens) per GEMM must be a multiple of this under ``recipe`` (TE's own answer: 16, MXFP8 32, NVFP4 128)."""
    from transformer_engine.pytorch.quantization import get_align_size_for_quantization

    return get_align_size_for_quantization(recipe)


class TELinearEngine:
    """A TE ``te.Linear`` used as a compute engine over *our* ``weight`` and ``bias``.

    Its own parameters are removed at build time; each call binds the caller's parameters as ``weight``/``bias``
    (TE reads them with ``getattr``), so the optimizer, DDP and checkpoints only ever see the dense layer's
    parameters, and no TE module (with its ``_extra_state``) enters the model's module tree. Built lazily on the
    first CUDA call (the swap runs before the model moves to the GPU).

    Under a quantized recipe TE keeps its quantized weight between calls while :class:`QuantizedWeightCache` says
    the weight is unchanged (micro-batches of one optimizer step, a frozen base under LoRA: quantized once);
    ``cache_weights=False`` quantizes on every call and keeps nothing between steps.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device,
                 params_dtype: torch.dtype, cache_weights: bool = True) -> None:
        import transformer_engine.pytorch as te

        self.bias = bias
        self.weight_cache = QuantizedWeightCache(cache_weights)
        self.module: Any = te.Linear(in_features, out_features, bias=bias, device=device, params_dtype=params_dtype)
        del self.module._parameters["weight"]
        if bias:
            del self.module._parameters["bias"]

    def __call__(self, x: Tensor, weight: Any, bias: Optional[Tensor], recipe: Any, held: bool = False,
                 fresh: bool = False) -> Tensor:
        """``x @ weight.T + bias`` on TE; ``recipe``: the quantized recipe TE's autocast has active; ``held``:
        ``weight`` is a quantized copy held for a frozen weight (:mod:`~lightning_te_moe.experts.resident`; TE takes
        it as a primary quantized weight); ``fresh``: quantize now and keep the copy for :meth:`take_quantized`."""
        if (bias is not None) != self.bias:
            raise ValueError(f"engine built with bias={self.bias} called with bias={bias is not None}")
        names = self.module.__dict__
        names["weight"] = weight
        if bias is not None:
            names["bias"] = bias
        try:
            return self.module(x, is_first_microbatch=self.weight_cache.for_call(weight, recipe, held, fresh))
        finally:
            names.pop("weight", None)
            if bias is not None:
                names.pop("bias", None)

    def take_quantized(self) -> Any:
        """TE's quantized copy of the weight of the last ``fresh`` call, handed over: TE keeps none."""
        return self.module._fp8_workspaces.pop("weight")
