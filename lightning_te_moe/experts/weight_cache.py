"""When TE may reuse its quantized copy of the expert weights (``GroupedLinear``'s ``is_first_microbatch``).

Under an FP8 recipe TE quantizes (and, on Hopper, transposes) every expert weight on every forward, unless the
caller says the weights are unchanged since the last one: ``is_first_microbatch=False`` reuses TE's cached
copies. That pays for gradient accumulation (micro-batches 2..n of one optimizer step) and for frozen experts
(quantized once, not every step). Reusing a stale copy would silently compute with old weights, so the cache
key covers everything that changes the weight or how it is quantized:

- the parameter's version counter (every in-place update through autograd-visible ops: ``load_state_dict``,
  ``copy_``, the non-fused torch optimizers, the divergence guard's rollback);
- its storage address (a parameter whose ``.data`` was replaced);
- for a trainable weight, the number of torch optimizer steps taken in this process (a global step hook:
  fused optimizers such as ``AdamW(fused=True)`` update in place without bumping the version counter; a frozen
  weight gets no gradient, so no optimizer touches it and it stays quantized across steps);
- the TE recipe (class and settings), the grad mode and whether the weight is trainable (TE caches only the
  row/column-wise copies the first call needed).

Weights changed any other way (e.g. through ``.data`` in place) must call :meth:`QuantizedWeightCache.invalidate`.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

import torch
from torch import Tensor

_optimizer_steps = 0
_hook: Optional[Any] = None


def _count_step(*_args: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """Torch optimizer steps taken in this process since the first call (registers the global hook once)."""
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook = register_optimizer_step_post_hook(_count_step)
    return _optimizer_steps


class QuantizedWeightCache:
    """Per-engine memory of what TE last quantized: answers TE's ``is_first_microbatch`` for one call."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._key: Optional[Hashable] = None

    def first_microbatch(self, weight: Tensor, recipe: Any) -> Optional[bool]:
        """None: no caching (no quantized recipe, disabled, or inside a CUDA-graph capture: the graph replays the
        quantization on every step, and a cached copy would be read by address long after this call); True:
        quantize and cache; False: reuse the cache."""
        if not self.enabled or recipe is None or (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._key = None
            return None
        steps = optimizer_steps() if weight.requires_grad else 0
        key = (weight._version, weight.data_ptr(), steps, type(recipe).__name__, repr(recipe),
               torch.is_grad_enabled(), weight.requires_grad)
        first = key != self._key
        self._key = key
        return first

    def for_call(self, weight: Any, recipe: Any, held: bool = False, fresh: bool = False) -> Optional[bool]:
        """TE's ``is_first_microbatch`` for one engine call: None for a held quantized copy (TE takes it as it is,
        :mod:`.resident`), True for a fresh quantization whose copies the caller takes away (so this cache forgets
        them), else :meth:`first_microbatch`."""
        if held:
            return None
        if fresh:
            self.invalidate()
            return True
        return self.first_microbatch(weight, recipe)

    def invalidate(self) -> None:
        """Forget the cached copy: the next quantized call quantizes the weight again."""
        self._key = None
