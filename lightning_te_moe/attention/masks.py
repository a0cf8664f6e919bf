"""The mask swapped attention receives: the model's mask arguments, kept rather than expanded.

transformers builds one mask per layer type from the 2D padding mask, position ids (packed sequences) and
overlays. A swapped layer takes TE's built-in causal / sliding-window / right-padding mask only when it is
exactly the mask the model would have built; otherwise the model's own mask is built and used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class TEMask:
    """How TE can apply a layer's mask: ``key_valid`` [batch, seq] (None: no padding), or why it cannot."""

    key_valid: Optional[Tensor] = None
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not self.reason


class DeferredMask:
    """The arguments transformers passed to the mask interface; expanded only when a layer needs them."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self._built: dict[str, Optional[Tensor]] = {}
        self._te: dict[Optional[int], TEMask] = {}

    @classmethod
    def capture(cls, **kwargs: Any) -> DeferredMask:
        """The mask-interface entry registered for the swapped implementation."""
        return cls(kwargs)

    def graph_key(self) -> Optional[tuple]:
        """What a CUDA graph of a layer that reads this mask depends on (:mod:`lightning_te_moe.graphs`): with no
        padding mask or overlay the mask is the causal one with its window, the same at every step of a shape, so
        the key is that description; otherwise None (its tensors change between steps: the layer runs eagerly)."""
        kw = self.kwargs
        described = {k: kw.get(k) for k in ("local_size", "q_length", "kv_length", "batch_size", "q_offset", "kv_offset")}
        if not (kw.get("allow_is_causal_skip") is True and kw.get("attention_mask") is None
                and all(v is None or isinstance(v, int) for v in described.values())):
            return None
        return ("causal", *described.items())

    def graph_tensors(self) -> list[Tensor]:
        """The tensors among the mask arguments (a graph takes them as inputs: copied in at every replay)."""
        return [v for _, v in sorted(self.kwargs.items()) if isinstance(v, Tensor)]

    def with_graph_tensors(self, tensors: list[Tensor]) -> DeferredMask:
        """The same mask arguments over ``tensors`` (in :meth:`graph_tensors` order): the graph's static inputs."""
        replaced = iter(tensors)
        return DeferredMask({k: next(replaced) if isinstance(v, Tensor) else v for k, v in sorted(self.kwargs.items())})

    def build(self, implementation: str) -> Optional[Tensor]:
        """The mask ``implementation`` (eager, sdpa, ...) would have received from the model."""
        if implementation not in self._built:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

            self._built[implementation] = ALL_MASK_ATTENTION_FUNCTIONS[implementation](**self.kwargs)
        return self._built[implementation]

    def for_te(self, window: Optional[int]) -> TEMask:
        """TE's mask for a layer with this sliding window (None: full causal), checked against the model's.

        The model's boolean mask must equal ``causal (and i - j < window)`` and ``key j is not padding`` with
        padding only on the right (TE reads padding as per-sequence lengths). Without a padding mask or overlay
        that holds by construction; otherwise it is checked: one host sync per layer type and forward. The
        result is shared by every layer with the same window.
        """
        if window not in self._te:
            self._te[window] = self._check(window)
        return self._te[window]

    def _check(self, window: Optional[int]) -> TEMask:
        kw = self.kwargs
        q_offset, kv_offset = kw.get("q_offset", 0), kw.get("kv_offset", 0)
        if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
                and kw["q_length"] == kw["kv_length"]):
            return TEMask(reason="cached keys/values (generation)")
        if self._plainly_causal(window):
            return TEMask()
        from transformers.masking_utils import sdpa_mask

        args = {k: v for k, v in kw.items() if k != "allow_is_causal_skip"}
        dense = sdpa_mask(**args, allow_is_causal_skip=False)
        if dense is None:
            return TEMask(reason="the model's mask is not causal")
        dense = dense[:, 0].expand(kw["batch_size"], -1, -1)
        n = kw["q_length"]
        pos = torch.arange(n, device=dense.device)
        distance = pos[:, None] - pos[None, :]
        pattern = distance >= 0 if window is None else (distance >= 0) & (distance < window)
        key_valid = dense.diagonal(dim1=1, dim2=2)  # a real key always sees itself; a padding key nobody
        same = (dense == (pattern[None] & key_valid[:, None, :])).all()
        right = (key_valid.cummin(dim=1).values == key_valid).all()
        same, right, nonempty, full = torch.stack([same, right, key_valid[:, 0].all(), key_valid.all()]).tolist()
        if not same:
            return TEMask(reason="the model's mask is not causal/sliding-window plus padding (packed sequences or an overlay)")
        if not right:
            return TEMask(reason="left padding (TE reads padding as sequence lengths)")
        if not nonempty:
            return TEMask(reason="a sequence with no tokens")
        return TEMask(None if full else key_valid)

    def _plainly_causal(self, window: Optional[int]) -> bool:
        """No padding mask and no overlay (transformers then allows SDPA to skip the mask): the mask is the causal
        one, with the sliding window it was made for, so TE's own mask equals it without a check (and without the
        check's host sync). The window the mask was made with must be this layer's."""
        kw = self.kwargs
        return (kw.get("allow_is_causal_skip") is True and kw.get("attention_mask") is None
                and kw.get("local_size") == window)
