"""Frozen weights held on the GPU only in quantized form; their high-precision values wait on the host.

Fine-tuning freezes the experts (19 of GPT-OSS-20B's 21B parameters) and, under LoRA, the dense layers' base
weights. Under FP8, TE's weight cache (:mod:`.weight_cache`) keeps a quantized copy of each frozen weight *beside*
its BF16 parameter, so the base takes twice its size (an FP8 copy for the forward and a transposed one for the
gradient of the input: as many bytes as BF16), and a CUDA graph captured over it quantizes a third copy into its
pool. Here the quantized copies *replace* the BF16 values on the GPU: after the first quantization the parameter's
data moves to host memory, and TE takes the quantized tensors as primary quantized weights (its
``quantized_model_init`` path) on every later call, a graph's replays included. The parameter stays where it was,
so ``state_dict`` and checkpoints still hold the exact BF16 values (from the host). Used by the grouped experts
(:mod:`.module`) and the dense layers on TE (:mod:`lightning_te_moe.dense.module`).

Only for recipes whose scales come from the tensor itself (current and block scaling, MXFP8, NVFP4): delayed
scaling's weight scale follows an amax history that the first forward has not filled yet. A backward override, a
recipe without quantization (a step-down to BF16), or a changed weight brings the values back or quantizes again;
:meth:`ResidentWeights.release` puts them back on the GPU for good (unswap, step-down).
"""

from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence

import torch
from torch import Tensor

from ..graphs import invalidate_graphs

#: TE recipes whose weight scales depend on more than the weight (a history filled by the forwards).
STATEFUL_RECIPES = ("DelayedScaling",)


class ResidentWeights:
    """For one frozen weight: its quantized copies while valid, and where its high-precision values are."""

    def __init__(self, enabled: bool = True, host: str = "cpu") -> None:
        self.enabled = enabled
        self.host = torch.device(host)
        self._quantized: Optional[list[Any]] = None
        self._key: Optional[Hashable] = None
        self._with_grad = False
        self._home: Optional[torch.device] = None

    def eligible(self, weight: Tensor, recipe: Any) -> bool:
        """Whether ``weight`` may live on the GPU only as ``recipe``'s quantized copies."""
        return (self.enabled and recipe is not None and not weight.requires_grad
                and type(recipe).__name__ not in STATEFUL_RECIPES
                and getattr(recipe, "backward_override", None) is None)

    def quantized(self, weight: Tensor, recipe: Any, backward: Optional[bool] = None) -> Optional[list[Any]]:
        """The held quantized copies, if they are still those of ``weight`` under ``recipe`` (with the
        input-gradient copies when ``backward`` needs them: default, grad mode); else None."""
        if self._quantized is None or self._key != self._make_key(weight, recipe):
            return None
        if _backward(backward) and not self._with_grad:
            return None  # quantized for a forward only: the transposed copies for the backward are missing
        return self._quantized

    def source(self, weight: Tensor, device: torch.device) -> Tensor:
        """``weight`` on the compute device: the parameter itself, or a temporary copy of its parked values."""
        return weight.detach().to(device) if weight.device != device else weight

    def keep(self, weight: Tensor, recipe: Any, quantized: Sequence[Any], device: torch.device,
             backward: Optional[bool] = None) -> None:
        """Hold ``quantized`` as ``weight``'s copy on ``device`` under ``recipe`` (made for a call that ``backward``
        follows: default, grad mode); park its values on the host."""
        if weight.device != self.host:
            weight.data = weight.data.to(self.host, copy=True)
        invalidate_graphs()  # graphs captured before read other tensors for this weight
        self._home = device
        self._quantized = list(quantized)
        self._with_grad = _backward(backward)
        self._key = self._make_key(weight, recipe)

    def release(self, weight: Tensor) -> None:
        """Drop the quantized copies and bring parked values back to the GPU they came from."""
        if self._quantized is not None:
            invalidate_graphs()  # a captured graph reads the copies by address
        self._quantized, self._key = None, None
        if self._home is not None and weight.device == self.host:
            weight.data = weight.data.to(self._home)
        self._home = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``deepcopy`` of the model) know where the values belong but hold no quantized tensors."""
        return {**self.__dict__, "_quantized": None, "_key": None}

    @staticmethod
    def _make_key(weight: Tensor, recipe: Any) -> Hashable:
        return weight._version, weight.data_ptr(), type(recipe).__name__, repr(recipe)


def _backward(backward: Optional[bool]) -> bool:
    """Whether an input-gradient GEMM follows the call (it needs the transposed copies); None: grad mode says."""
    return torch.is_grad_enabled() if backward is None else backward
