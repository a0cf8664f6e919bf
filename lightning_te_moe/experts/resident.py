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

from contextlib import contextmanager
from typing import Any, Hashable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

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

    def move_quantized(self, to_host: bool, memo: dict[Any, Tensor]) -> int:
        """Move the held quantized copies' buffers to the host (``to_host``) or back to their GPU, through TE's
        ``prepare_for_saving`` / ``restore_from_saved`` (the protocol TE's own autograd functions use to move them);
        one copy per storage (``memo``), views kept. A grouped tensor stays where it is (TE 2.20's
        ``GroupedTensorStorage.prepare_for_saving`` drops its per-member views for good), as does one without that
        protocol. Returns the bytes moved."""
        if self._quantized is None or self._home is None:
            return 0
        device = self.host if to_host else self._home
        moved = 0
        for tensor in self._quantized:
            if hasattr(tensor, "quantized_tensors") or not hasattr(tensor, "restore_from_saved"):
                continue
            buffers, _ = tensor.prepare_for_saving()
            before = len(memo)
            tensor.restore_from_saved(relocate(buffers, device, memo))
            moved += sum(memo[key].untyped_storage().nbytes() for key in list(memo)[before:])
        return moved

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``deepcopy`` of the model) know where the values belong but hold no quantized tensors."""
        return {**self.__dict__, "_quantized": None, "_key": None}

    @staticmethod
    def _make_key(weight: Tensor, recipe: Any) -> Hashable:
        return weight._version, weight.data_ptr(), type(recipe).__name__, repr(recipe)


def _backward(backward: Optional[bool]) -> bool:
    """Whether an input-gradient GEMM follows the call (it needs the transposed copies); None: grad mode says."""
    return torch.is_grad_enabled() if backward is None else backward


def relocate(tensors: Sequence[Optional[Tensor]], device: torch.device, memo: dict[Any, Tensor]) -> list[Any]:
    """``tensors`` copied to ``device``: one new allocation per storage (``memo`` maps the old storages to their
    copies across calls), each tensor a view of its copy at the same offset, size and stride. ``None`` stays."""
    out: list[Any] = []
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            out.append(tensor)
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in memo:
            source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            memo[key] = torch.empty(storage.nbytes(), dtype=torch.uint8, device=device).copy_(source)
        view = torch.empty(0, dtype=tensor.dtype, device=device)
        out.append(view.set_(memo[key].untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()))
    return out


def held_resident_weights(model: nn.Module) -> list[ResidentWeights]:
    """Every :class:`ResidentWeights` of ``model``'s swapped modules (their ``resident_weights()``)."""
    found: Iterable[ResidentWeights] = (
        resident for module in model.modules() if callable(getattr(module, "resident_weights", None))
        for resident in module.resident_weights())
    return [resident for resident in found if resident._quantized is not None]


@contextmanager
def parked_resident_weights(model: nn.Module) -> Iterator[int]:
    """The quantized copies held for ``model``'s frozen weights wait on the host inside the block (empty the
    allocator's cache there) and come back in new, packed GPU memory after it. They are made in the first forward,
    between that step's activations, and each keeps the segment it landed in reserved after the activations are
    freed: GPT-OSS-20B with LoRA on the experts at 8 x 1,024 tokens ran out of memory with 30.4 GiB free in 74
    segments held by 1,806 such copies (15.4 GiB; H200 capped at 78.5 GiB, cuBLASLt 13.10, 2026-11-28,
    ``benchmarks/full_model.py --memory-history``). Yields the bytes of the copies moved. The graphs that read the
    old addresses are dropped."""
    held = held_resident_weights(model)
    to_host: dict[Any, Tensor] = {}
    moved = sum(resident.move_quantized(True, to_host) for resident in held)
    del to_host  # the buffers point at the host copies now: the GPU memory goes with the last reference
    try:
        yield moved
    finally:
        back: dict[Any, Tensor] = {}
        for resident in held:
            resident.move_quantized(False, back)
        if moved:
            invalidate_graphs()
