"""The two grouped-GEMM backends: TE ``GroupedLinear`` (CUDA) and a torch reference with the same math.

Both take rows already sorted and padded by expert, weights ``[E, out, in]`` (the TE/nn.Linear layout) and
optional biases ``[E, out]``; both return ``[rows, out]``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..policy.recipes import GROUPED_MM_MAX_TOKENS, grouped_weight_quantize
from ..policy.te_features import te_has
from .weight_cache import QuantizedWeightCache


@lru_cache(maxsize=1)
def te_available() -> bool:
    """Transformer Engine's PyTorch API imports and is at least the TE the package needs (looked up lazily: the
    package works without TE, and treats a TE below its floor as absent, as the plan's ``te-below-floor`` says)."""
    if importlib.util.find_spec("transformer_engine") is None or not te_has("autocast"):
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




def grouped_mm_runs(device: torch.device, dtype: torch.dtype, dims: Sequence[int]) -> bool:
    """torch's fused grouped GEMM runs here: CUDA with its kernels (CC 9.x/10.x), BF16, every matrix dimension
    16-byte aligned (CPU's lacks a robust backward)."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and all(d % 8 == 0 for d in dims) and torch.cuda.get_device_capability(device)[0] in (9, 10))


def prefer_grouped_mm(tokens: int, recipe: Any, native: bool) -> bool:
    """BF16 experts (no quantized recipe) with TE's native grouped GEMM unavailable, at most
    :data:`GROUPED_MM_MAX_TOKENS` tokens: torch's ``grouped_mm`` beats TE's one GEMM per expert there."""
    return recipe is None and not native and tokens <= GROUPED_MM_MAX_TOKENS


def grouped_mm_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``x @ weight[e].T`` per expert block with torch's ``grouped_mm``; ``offsets``: cumulative rows per expert (int32,
    on the device). An inner or output dimension that is not a multiple of 8 (a LoRA rank of 4) is zero-padded up to
    one: the same products, and the padding gets zero gradients."""
    pad = -weight.size(1) % 8
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
    inner = -weight.size(2) % 8
    if inner:
        weight = F.pad(weight, (0, inner))
        x = F.pad(x, (0, inner))
    out = F.grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=offsets)
    return out[:, :out.size(1) - pad] if pad else out


def _grouped_mm_ok(x: Tensor, weight: Tensor) -> bool:
    return grouped_mm_runs(x.device, x.dtype, weight.shape[1:])


def torch_grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, splits: Optional[list[int]]) -> Tensor:
    """Reference grouped GEMM ``x @ weight[e].T`` per expert block: ``grouped_mm`` where it runs (``offsets``:
    cumulative rows per expert on the device), else a loop over the host ``splits``."""
    weight = weight.to(x.dtype)
    if _grouped_mm_ok(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    if splits is None:
        raise ValueError("a dispatch without host split sizes needs torch's grouped_mm (CUDA, BF16, dims % 8)")
    parts = [F.linear(chunk, weight[e]) for e, chunk in enumerate(x.split(splits)) if splits[e]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.size(1))


class _ExpertViews(torch.autograd.Function):
    """``weight [E, out, in]`` -> its E expert views, with a backward that does not copy TE's weight gradients.

    TE's ``GroupedLinear`` computes the E weight gradients into one packed ``[E, out, in]`` buffer and returns
    its rows; plain ``unbind``'s backward would ``stack`` them into a second full buffer (a copy of every weight
    gradient each step, and both alive at once). Here, when the E gradients are consecutive contiguous rows of
    one storage (always, on TE's split path), the packed buffer itself becomes the gradient; otherwise (some
    expert got no gradient, another TE path) they are stacked as before.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.dtype, ctx.device = weight.shape, weight.dtype, weight.device
        return weight.unbind(0)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> Tensor:
        packed = packed_view(grads, ctx.shape)
        if packed is not None:
            return packed
        first = next((g for g in grads if g is not None), None)
        if first is None:
            return torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        zero = first.new_zeros(ctx.shape[1:])
        return torch.stack([zero if g is None else g for g in grads])


def packed_view(grads: Sequence[Optional[Tensor]], shape: torch.Size) -> Optional[Tensor]:
    """``[E, out, in]`` over the storage of ``grads`` when they are its consecutive contiguous rows, else None."""
    first = grads[0] if grads else None
    if first is None or len(grads) != shape[0] or first.shape != shape[1:]:
        return None
    step = first.numel()
    base, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    dtype = first.dtype
    if not all(g is not None and g.dtype == dtype and g.shape == first.shape and g.is_contiguous()
               and g.untyped_storage().data_ptr() == base and g.storage_offset() == offset + i * step
               for i, g in enumerate(grads)):
        return None
    if (offset + step * len(grads)) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return first.as_strided(shape, (step, shape[2], 1), offset)


class _GroupedWeight(torch.autograd.Function):
    """``weight [E, out, in]`` -> one TE ``GroupedTensor`` over the same storage (no copy), whose gradient (TE's one
    ``[E, out, in]`` weight-gradient buffer) is the weight's."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return _wrap_grouped(weight.detach())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _wrap_grouped(weight: Tensor) -> Any:
    from transformer_engine.pytorch.tensor.grouped_tensor import GroupedTensor

    e, out_features, in_features = weight.shape
    return GroupedTensor.make_grouped_tensor_from_rowwise_data(
        num_tensors=e, tensor_shape=(out_features, in_features), rowwise_data=weight.contiguous().view(-1))


def grouped_weight(weight: Tensor) -> Any:
    """``weight [E, out, in]`` as TE's single grouped weight: a ``GroupedTensor`` view whose gradient flows back."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return _wrap_grouped(weight)
    return _GroupedWeight.apply(weight)


def expert_views(weight: Tensor) -> tuple[Tensor, ...]:
    """``weight.unbind(0)`` whose backward adopts TE's packed weight-gradient buffer instead of stacking a copy."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight.unbind(0)
    return _ExpertViews.apply(weight)


class TEGroupedGemm:
    """A TE ``GroupedLinear`` used as a compute engine over *our* parameters.

    Its own per-expert parameters are removed at build time; each call binds views of the caller's stacked
    ``[E, out, in]`` weight as ``weight{i}`` (:func:`expert_views`: TE's packed weight gradients become the
    stacked gradient without a copy) and, for an engine built with ``bias=True``, views of the ``[E, out]``
    bias as ``bias{i}`` (TE adds them in its GEMM epilogue and computes their gradients in its backward). So
    the optimizer, DDP and checkpoints only ever see the swapped module's plain parameters, and the engine can
    be built lazily on the first CUDA forward (the swap itself runs before the model moves to the GPU).

    Under an FP8 recipe TE keeps its quantized weights between calls while :class:`QuantizedWeightCache` says
    the weight is unchanged (micro-batches of one optimizer step, frozen experts); ``cache_weights=False``
    quantizes on every call and keeps nothing between steps.

    ``native=True`` builds TE's single-grouped-GEMM path (``use_grouped_tensor``: one cuBLASLt grouped GEMM for
    all experts, split sizes read on the device); the caller picks it only where :func:`native_grouped_gemm`
    says TE runs it, and passes the split sizes as a device tensor. There, under a recipe of
    :data:`~lightning_te_moe.policy.recipes.GROUPED_WEIGHT_RECIPES`, the stacked weight is bound as TE's one grouped
    weight (:func:`grouped_weight`; ``GroupedLinear.single_grouped_weight``, set per call): TE quantizes all
    experts in one kernel and hands back one weight gradient.
    """

    def __init__(self, num_gemms: int, in_features: int, out_features: int, device: torch.device,
                 params_dtype: torch.dtype, bias: bool = False, cache_weights: bool = True,
                 native: bool = False) -> None:
        import transformer_engine.pytorch as te

        self.num_gemms = num_gemms
        self.bias = bias
        self.native = native
        self.weight_cache = QuantizedWeightCache(cache_weights)
        # TE < 2.17 has no use_grouped_tensor (only its split path); native is only ever asked for on TE >= 2.19.
        path = {"use_grouped_tensor": native} if te_has("use_grouped_tensor") else {}
        self.module: Any = te.GroupedLinear(num_gemms, in_features, out_features, bias=bias, device=device,
                                            params_dtype=params_dtype, **path)
        self._names = [f"weight{i}" for i in range(num_gemms)]
        self._bias_names = [f"bias{i}" for i in range(num_gemms)] if bias else []
        for name in self._names + self._bias_names:
            del self.module._parameters[name]

    def __call__(self, x: Tensor, weight: Tensor | Sequence[Any], splits: Optional[list[int]],
                 bias: Optional[Tensor] = None, device_splits: Optional[Tensor] = None, recipe: Any = None,
                 fresh: bool = False) -> Tensor:
        """``weight``: the stacked ``[E, out, in]`` weight, or the per-expert quantized copies held for a frozen one
        (:mod:`.resident`; TE takes them as primary quantized weights); ``splits``: rows per expert on the host (split
        path); ``device_splits``: the same on the device (native path); ``recipe``: the quantized recipe TE's
        autocast has active (:func:`active_recipe`), None for BF16/FP16; ``fresh``: quantize the weight now and keep
        TE's quantized copies for :meth:`take_quantized`."""
        if (bias is not None) != self.bias:
            raise ValueError(f"engine built with bias={self.bias} called with bias={bias is not None}")
        if self.native and device_splits is None:
            raise ValueError("TE's native grouped GEMM reads the split sizes on the device: pass device_splits")
        if not self.native and splits is None:
            raise ValueError("TE's split GEMM path reads the split sizes on the host: pass splits")
        held = isinstance(weight, (list, tuple))
        single = not (held or fresh) and self.grouped_weight_runs(weight, x, recipe)
        names = self.module.__dict__
        if single:
            names["weight"] = grouped_weight(weight)
        else:
            names.update(zip(self._names, weight if held else expert_views(weight)))
        if bias is not None:
            names.update(zip(self._bias_names, bias.unbind(0)))
        # TE reads this per forward; its constructor sets it only behind an environment variable (experimental).
        self.module.single_grouped_weight = single
        try:
            m_splits = device_splits if self.native else splits
            return self.module(x, m_splits, is_first_microbatch=self.weight_cache.for_call(weight, recipe, held, fresh))
        finally:
            for name in ["weight", *self._names, *self._bias_names]:
                names.pop(name, None)

    def grouped_weight_runs(self, weight: Tensor, x: Tensor, recipe: Any) -> bool:
        """Whether this call binds the stacked weight as TE's one grouped weight: a native engine, the weight in the
        compute dtype, and :func:`grouped_weight_applies`."""
        return self.native and weight.dtype == x.dtype and grouped_weight_applies(recipe, x.dtype)

    def take_quantized(self) -> list[Any]:
        """TE's quantized copies of the weights of the last ``fresh`` call, handed over: TE keeps none of them."""
        return [self.module._fp8_workspaces.pop(name) for name in self._names]


def active_recipe() -> Any:
    """The quantized recipe TE's autocast has active right now, or None (BF16/FP16, or outside any autocast)."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    return FP8GlobalStateManager.get_fp8_recipe() if FP8GlobalStateManager.is_fp8_enabled() else None


_NATIVE: dict[tuple[str, torch.dtype], bool] = {}


def native_grouped_gemm(recipe: Any, dtype: torch.dtype) -> bool:
    """Whether TE runs its native grouped GEMM for ``recipe`` (None: BF16/FP16) and ``dtype`` on this device.

    TE's own predicate decides (compute capability 9.0-11.0, cuBLASLt >= 13.3, 13.4 on Hopper, per-recipe
    minimums; no DelayedScaling, no ``backward_override``); a TE without it has no native path.
    """
    key = (f"{type(recipe).__name__}:{recipe!r}", dtype)
    if key not in _NATIVE:
        try:
            from transformer_engine.pytorch.module.grouped_linear import is_module_grouped_tensor_path_supported
        except ImportError:
            _NATIVE[key] = False
        else:
            _NATIVE[key] = bool(is_module_grouped_tensor_path_supported(recipe, dtype))
    return _NATIVE[key]


def grouped_weight_applies(recipe: Any, dtype: torch.dtype) -> bool:
    """Whether trainable expert weights go to TE as one grouped weight under ``recipe`` and ``dtype`` on this stack:
    a recipe of ``GROUPED_WEIGHT_RECIPES``, a TE that has the grouped weight, and TE's native grouped GEMM by TE's
    own predicate (off that path TE raises on a grouped weight instead of falling back)."""
    return grouped_weight_quantize(recipe) and te_has("single_grouped_weight") and native_grouped_gemm(recipe, dtype)


def te_applies_bias(weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether TE's GEMM may add ``bias`` (epilogue) and compute its gradient, rather than our outside path.

    Yes whenever TE returns every gradient autograd will ask for: the weight is trainable (TE's backward then
    computes the bias gradient with the weight gradient), or no bias gradient is wanted (frozen bias, or
    grad mode off). No for a frozen weight with a trainable bias under grad mode: TE 2.20 drops that bias
    gradient, so the bias is added outside TE.
    """
    if bias is None:
        return False
    return weight.requires_grad or not (bias.requires_grad and torch.is_grad_enabled())
