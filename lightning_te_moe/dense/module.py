"""``TEDenseLinear``: an ``nn.Linear`` whose GEMM runs on TE's ``te.Linear`` while a quantized recipe is active."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts.gemm import active_recipe
from ..experts.resident import ResidentWeights
from ..graphs import invalidate_graphs
from .engine import TELinearEngine, dim_multiple, row_alignment, te_runs


class TEDenseLinear(nn.Linear):
    """The replaced layer's own ``weight`` and ``bias`` (the same parameter objects), computed by TE.

    It *is* an ``nn.Linear``: the state dict keys and layout are the original's (no TE ``_extra_state``), PEFT
    puts its ``lora.Linear`` around it like around any linear layer, ``merge`` works on its ``weight``. On CUDA
    with TE, inside a TE ``autocast`` whose recipe is quantized (the plugin's forward context enters the active
    rung's dense recipe every step), the GEMM runs on ``te.Linear``; everywhere else (CPU, no TE, BF16/FP16/FP32
    rungs) it is ``F.linear``, the same GEMM nn.Linear runs, without TE's per-call host work. A call whose row
    count is not a multiple of the recipe's alignment gets zero rows appended (and cut off the output): zero rows
    change no scale, output row or gradient. Weight dimensions TE cannot run under the active recipe fall back to
    ``F.linear`` (counted in :attr:`calls`, warned once). Under ``torch.compile`` the TE call runs eagerly.
    A frozen weight (a LoRA base) is held on the GPU only as TE's quantized copy while a stateless quantized
    recipe runs (:mod:`~lightning_te_moe.experts.resident`); any other call brings its values back first.

    ``calls`` counts the TE calls and every fallback by its reason.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, cache_quantized_weights: bool = True,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.cache_quantized_weights = cache_quantized_weights
        self.calls: Counter = Counter()
        self._engines: dict[str, TELinearEngine] = {}
        self._warned: set[str] = set()
        self._resident = ResidentWeights(cache_quantized_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cache_quantized_weights: bool = True) -> TEDenseLinear:
        """A TE layer holding ``linear``'s own parameter objects (no copy)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    cache_quantized_weights=cache_quantized_weights, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        if te_runs(input):
            recipe = active_recipe()
            if recipe is not None:
                return self._te_forward(input, recipe)
        return self._plain(input)

    def _plain(self, input: Tensor) -> Tensor:
        self._resident.release(self.weight)  # values parked on the host come back first
        return F.linear(input, self.weight, self.bias)

    @torch.compiler.disable
    def _te_forward(self, input: Tensor, recipe: Any) -> Tensor:
        multiple = dim_multiple(recipe)
        if self.in_features % multiple or self.out_features % multiple:
            self._fall_back(f"{type(recipe).__name__} needs in/out features that are multiples of {multiple}"
                            f" (this layer: {self.in_features}/{self.out_features})")
            return self._plain(input)
        rows = input.numel() // self.in_features
        if rows == 0:
            self._fall_back("no rows")
            return self._plain(input)
        pad = -rows % row_alignment(recipe)
        engine = self._engine(input.device)
        self.calls["te"] += 1
        if not pad:
            return self._run(engine, input, recipe)
        self.calls["te, rows padded"] += 1
        flat = F.pad(input.reshape(rows, self.in_features), (0, 0, 0, pad))
        out = self._run(engine, flat, recipe)[:rows]
        return out.reshape(*input.shape[:-1], self.out_features)

    def _run(self, engine: TELinearEngine, x: Tensor, recipe: Any) -> Tensor:
        """TE's GEMM, on the held quantized copy of a frozen weight where there is one (kept at its first call)."""
        resident, weight = self._resident, self.weight
        if not resident.eligible(weight, recipe):
            resident.release(weight)
            return engine(x, weight, self.bias, recipe)
        backward = torch.is_grad_enabled() and x.requires_grad  # TE then makes the transposed copy too
        held = resident.quantized(weight, recipe, backward)
        if held is not None:
            return engine(x, held[0], self.bias, recipe, held=True)
        out = engine(x, resident.source(weight, x.device), self.bias, recipe, fresh=True)
        resident.keep(weight, recipe, [engine.take_quantized()], x.device, backward)
        return out

    def _engine(self, device: torch.device) -> TELinearEngine:
        key = str(device)
        if key not in self._engines:
            self._engines[key] = TELinearEngine(self.in_features, self.out_features, self.bias is not None, device,
                                                self.weight.dtype, cache_weights=self.cache_quantized_weights)
        return self._engines[key]

    def _fall_back(self, reason: str) -> None:
        self.calls[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"[lightning-te-moe] dense layer {self.in_features}->{self.out_features} runs F.linear for"
                          f" this call: {reason}", stacklevel=3)

    def invalidate_quantized_weights(self) -> None:
        """Make TE quantize the weight again on the next quantized call (after changing it through ``.data``)."""
        for engine in self._engines.values():
            engine.weight_cache.invalidate()
        invalidate_graphs()  # a captured graph reads the weights by address
        self._resident.release(self.weight)

    def resident_weights(self) -> list[ResidentWeights]:
        """The frozen weight's quantized copies (``parked_resident_weights``)."""
        return [self._resident]

    def release_quantized_weights(self) -> None:
        """Bring a frozen weight held only in quantized form back to the GPU in high precision (unswap, merge)."""
        self._resident.release(self.weight)

    def keep_no_quantized_weights(self) -> None:
        """Quantize on every call and keep no quantized copy between calls (a sharded weight: see
        :meth:`~lightning_te_moe.experts.GroupedExperts.keep_no_quantized_weights`)."""
        self.invalidate_quantized_weights()
        self.cache_quantized_weights = False
        self._engines.clear()
        self._resident.enabled = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engines"] = {}  # TE engines hold no weights; rebuilt on the next CUDA call
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + ", te.Linear under quantized recipes"
