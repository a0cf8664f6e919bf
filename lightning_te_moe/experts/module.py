"""``GroupedExperts``: all experts of one MoE layer as two grouped GEMMs, with the original forward signature."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional, Protocol

import torch
from torch import Tensor, nn

from ..graphs import invalidate_graphs
from ..policy.recipes import te_recipe_alignment
from ..policy.state import PrecisionState
from .activations import activation_label, glu_params
from .bias_glu import bias_glu, fused_bias_glu_runs
from .gemm import (TEGroupedGemm, active_recipe, compute_dtype, grouped_mm_linear, grouped_mm_runs, native_grouped_gemm,
                   prefer_grouped_mm, te_applies_bias, te_available, torch_grouped_linear)
from .layouts import ExpertWeights, WeightCodec
from .resident import ResidentWeights
from .routing import Dispatch, add_expert_bias, combine, make_dispatch, permute, routed_bias
from .te_routing import FusedRouting, fused_permutation_available, fused_routing

if TYPE_CHECKING:
    from .lora import ExpertsLoRA

Backend = Literal["auto", "te", "torch"]


class Projection(Protocol):
    """What a grouped GEMM reads: ``weight [E, out, in]`` and an optional ``bias [E, out]``."""

    weight: Tensor
    bias: Optional[Tensor]


class LoraFactor(NamedTuple):
    """One grouped LoRA factor (``A [E, r, in]`` or ``B [E, out, r]``) as a bias-free projection."""

    weight: Tensor
    bias: Optional[Tensor] = None


class GroupedWeights(nn.Module):
    """One grouped projection: ``weight [E, out, in]`` and optional ``bias [E, out]``, plain parameters."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def extra_repr(self) -> str:
        e, out, inp = self.weight.shape
        return f"experts={e}, in_features={inp}, out_features={out}, bias={self.bias is not None}"


class GroupedExperts(nn.Module):
    """Drop-in replacement for an experts module: ``forward(hidden_states, top_k_index, top_k_weights)``.

    Tokens are sorted by expert and each expert's block padded to the alignment of the *active* experts recipe
    (read from ``state`` on every call) on the GEMM path TE takes, then ``fc1 -> activation -> fc2`` run as grouped
    GEMMs: TE ``GroupedLinear`` on CUDA when TE imports, the torch reference otherwise (same math). On the TE path TE's
    fused permute/unpermute kernels move the tokens (:mod:`.te_routing`), and under FP8 TE reuses its quantized
    weights while they are unchanged (``cache_quantized_weights``; :mod:`.weight_cache`). The routing weight
    multiplies the expert output after the down-projection bias, as every transformers experts class does.
    On the TE path the biases go through TE's GEMM epilogue (and its bias gradients) when the weights are
    trainable; a frozen weight with a trainable bias gets the bias added outside TE (see :mod:`.routing`),
    since TE 2.20 drops that bias gradient. On TE's native grouped GEMM the down-projection bias is always added
    after the combine (cheaper than TE's bias pass there). The torch backend adds the biases outside the GEMMs.

    ``state_dict`` is written in the original module's layout (``codec``) and either layout loads. A sharded model
    writes ours (``original_layout = False``, set when it is sharded): torch's distributed checkpoint and FSDP map
    every key back to a parameter by name, so a renamed key fails there; the HF export converts
    (:mod:`lightning_te_moe.distributed.export`).

    Under PEFT LoRA on the expert weights (``target_parameters``) PEFT's wrappers stay around this module and keep
    the adapters; ``lora`` (:class:`~.lora.ExpertsLoRA`) reads them and each active adapter runs as two grouped
    GEMMs on the same padded rows as the base GEMM (:meth:`_lora`).
    """

    def __init__(self, weights: ExpertWeights, activation: nn.Module, codec: WeightCodec, *,
                 backend: Backend = "auto", fp8_reason: Optional[str] = None,
                 state: Optional[PrecisionState] = None, cache_quantized_weights: bool = True) -> None:
        super().__init__()
        self.num_experts = weights.num_experts
        self.hidden_size = weights.hidden_size
        self.intermediate_size = weights.intermediate_size
        self.fc1 = GroupedWeights(weights.fc1_weight, weights.fc1_bias)
        self.activation = activation
        self.fc2 = GroupedWeights(weights.fc2_weight, weights.fc2_bias)
        self.codec = codec
        self.backend = backend
        #: Why FP8 is off for this module (None: FP8 allowed); such a module never enters an FP8 autocast.
        self.fp8_reason = fp8_reason
        self.state = state
        self.cache_quantized_weights = cache_quantized_weights
        #: PEFT's LoRA wrappers around this module (set by the swap of a PEFT model; not submodules).
        self.lora: Optional[ExpertsLoRA] = None
        self._engines: dict[tuple[str, str, bool, bool], TEGroupedGemm] = {}
        #: Frozen weights kept on the GPU only as TE's quantized copies (:mod:`.resident`), per projection.
        self._resident = {name: ResidentWeights(cache_quantized_weights) for name in ("fc1", "fc2")}
        #: ``state_dict`` in the original module's layout (True) or in ours (False: sharded models).
        self.original_layout = True
        self.register_state_dict_post_hook(_write_original_layout)
        self.register_load_state_dict_pre_hook(_read_original_layout)

    # -- layout -----------------------------------------------------------------------------------
    def weights(self) -> ExpertWeights:
        """The current parameters in our layout (no copies)."""
        return ExpertWeights(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

    def original_state_dict(self) -> dict[str, Tensor]:
        """The weights in the original module's ``state_dict`` layout (export helper; detached copies)."""
        return {k: v.detach().clone() for k, v in self.codec.encode(self.weights()).items()}

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        index, weights = top_k_index.reshape(x.size(0), -1), top_k_weights.reshape(x.size(0), -1)
        te_kernels = self._use_te(x)  # TE's kernels on CUDA: activation, permutation and (below) the GEMMs
        dtype = compute_dtype(x)
        with self._precision(te_kernels):
            recipe = active_recipe() if te_kernels else None  # the experts' own recipe, inside their autocast
            # TE's native grouped GEMM reads the split sizes on the device: the fused routing then skips the sync.
            native = te_kernels and native_grouped_gemm(recipe, dtype)
            # torch's grouped_mm reads its offsets on the device too: the torch dispatch then skips the sync.
            grouped_mm = x.is_cuda and grouped_mm_runs(x.device, dtype, self._gemm_dims())
            auto = self.backend == "auto"  # backend="te" keeps TE's GEMMs at every size
            use_te = te_kernels and not (auto and grouped_mm and prefer_grouped_mm(x.size(0), recipe, native))
            align = self._alignment(recipe, native)
            # The GEMMs read the split sizes on the device: TE's native grouped GEMM, or torch's grouped_mm.
            splits_on_device = native if use_te else grouped_mm
            # There a bias is a separate pass over every row plus a bias-gradient reduction: the up-projection's
            # goes into the activation kernel (:mod:`.bias_glu`) and the down-projection's is added after the
            # combine (:func:`routed_bias`, a [T, E] @ [E, H] product).
            glu = glu_params(self.activation)
            fc1_bias_in_glu = (te_kernels and splits_on_device and self.fc1.bias is not None
                               and fused_bias_glu_runs(x, glu))
            fc1_bias_in_te = use_te and not fc1_bias_in_glu and te_applies_bias(self.fc1.weight, self.fc1.bias)
            fc2_bias_in_te = use_te and not native and te_applies_bias(self.fc2.weight, self.fc2.bias)
            rows_bias_outside = self.fc1.bias is not None and not (fc1_bias_in_te or fc1_bias_in_glu)
            fc2_bias_outside = self.fc2.bias is not None and not fc2_bias_in_te
            # TE's permutation kernels serve torch's grouped_mm too: one pass each way instead of the torch
            # routing's gathers and copies (GPT-OSS-20B at 2,048 tokens on cuBLASLt 13.1, docs/performance.md).
            fused = None
            if ((use_te or splits_on_device) and te_kernels and not rows_bias_outside and x.size(0)
                    and fused_permutation_available()):
                fused = fused_routing(index, weights, self.num_experts, align, host_splits=not splits_on_device)
            route: Dispatch | FusedRouting
            if fused is not None:
                route = fused
                rows = fused.permute(x.to(dtype))
            else:
                route = make_dispatch(index, self.num_experts, align, host_splits=use_te or not grouped_mm)
                rows = permute(x.to(dtype), route)
            h = self._gemm("fc1", self.fc1, rows, route, use_te, fc1_bias_in_te, recipe, native)
            h = self._lora("fc1", rows, h, route, use_te)
            if fc1_bias_in_glu:
                assert glu is not None and self.fc1.bias is not None
                act = bias_glu(h, self.fc1.bias, route.device_splits, glu)
            else:
                if rows_bias_outside:
                    assert isinstance(route, Dispatch)  # biases outside TE always take the torch routing
                    h = add_expert_bias(h, self.fc1.bias, route)
                act = self.activation(h, fused=te_kernels)
            h = self._gemm("fc2", self.fc2, act, route, use_te, fc2_bias_in_te, recipe, native)
            h = self._lora("fc2", act, h, route, use_te)
        # The routing weight multiplies each row after its fc2 bias (inside the rows when TE added it).
        out = fused.combine(h) if fused is not None else combine(h, weights, route)
        if fc2_bias_outside:
            out = out + routed_bias(self.fc2.bias, index, weights, out.dtype)
        return out.to(hidden_states.dtype).reshape(shape)

    def _gemm_dims(self) -> list[int]:
        """Every matrix dimension of this layer's GEMMs, LoRA ranks included."""
        dims = [self.hidden_size, self.intermediate_size, self.fc1.weight.size(1)]
        if self.lora is not None:
            dims += self.lora.ranks()
        return dims

    def _use_te(self, x: Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "te":
            if not (x.is_cuda and te_available()):
                raise RuntimeError("GroupedExperts(backend='te') needs Transformer Engine and a CUDA input")
            return True
        return x.is_cuda and te_available()

    def _alignment(self, recipe: Any, native: bool) -> int:
        """Rows per expert block are padded to this: what the active experts recipe needs on the GEMM path TE
        takes (``native``: TE's grouped quantize kernels need 128 rows per expert for FP8 block scaling, MXFP8 and
        NVFP4; :data:`~lightning_te_moe.policy.recipes.ALIGNMENT`). ``recipe``: TE's active quantized recipe."""
        if self.fp8_reason is not None:
            return 1
        path = "native" if native else "split"
        if self.state is not None:
            return self.state.experts.alignment_for(path)
        return te_recipe_alignment(recipe, path) if recipe is not None else 1  # a user's own te.autocast

    def _precision(self, use_te: bool) -> AbstractContextManager:
        """The nested TE autocast for the experts recipe where it differs from the dense one (or FP8 is off)."""
        if not use_te:
            return nullcontext()
        import transformer_engine.pytorch as te

        state = self.state
        quantized = state.experts.is_te if state is not None else active_recipe() is not None
        if self.fp8_reason is not None:
            return te.autocast(enabled=False) if quantized else nullcontext()
        if state is not None and state.experts != state.dense:
            return te.autocast(enabled=state.experts.is_te, recipe=state.te_recipe(state.experts))
        return nullcontext()

    def _gemm(self, name: str, layer: Projection, x: Tensor, route: Dispatch | FusedRouting, use_te: bool,
              bias_in_te: bool = False, recipe: Any = None, native: bool = False) -> Tensor:
        """``x @ weight[e].T`` per expert block, plus ``bias[e]`` where ``bias_in_te`` (TE path only);
        ``recipe``: TE's active quantized recipe (None: BF16/FP16); ``native``: TE's native grouped GEMM."""
        weight = layer.weight
        if not use_te:
            return torch_grouped_linear(x, weight, route.offsets, route.splits)
        bias = layer.bias if bias_in_te else None
        engine = self._engine(name, weight.shape, x, bias is not None, native)
        resident = self._resident.get(name)  # the base projections (LoRA factors train: never held quantized)
        if resident is not None and resident.eligible(weight, recipe):  # frozen: its GPU copy is the quantized one
            held = resident.quantized(weight, recipe)
            if held is not None:
                return engine(x, held, route.splits, bias, route.device_splits, recipe)
            out = engine(x, resident.source(weight, x.device), route.splits, bias, route.device_splits, recipe,
                         fresh=True)
            resident.keep(weight, recipe, engine.take_quantized(), x.device)
            return out
        if resident is not None:
            resident.release(weight)
        if not torch.is_autocast_enabled(x.device.type):
            if weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
        return engine(x, weight, route.splits, bias, route.device_splits, recipe)

    def _engine(self, name: str, shape: torch.Size, x: Tensor, bias: bool, native: bool) -> TEGroupedGemm:
        key = (name, str(x.device), bias, native)
        if key not in self._engines:
            e, out_features, in_features = shape
            self._engines[key] = TEGroupedGemm(e, in_features, out_features, x.device, x.dtype, bias=bias,
                                               cache_weights=self.cache_quantized_weights, native=native)
        return self._engines[key]

    def resident_weights(self) -> list[ResidentWeights]:
        """The frozen projections' quantized copies (:func:`~.resident.parked_resident_weights`)."""
        return list(self._resident.values())

    def release_quantized_weights(self) -> None:
        """Bring frozen weights held only in quantized form back to the GPU in high precision (unswap, export)."""
        for name, layer in (("fc1", self.fc1), ("fc2", self.fc2)):
            self._resident[name].release(layer.weight)

    def _lora(self, name: str, x: Tensor, h: Tensor, route: Dispatch | FusedRouting, use_te: bool) -> Tensor:
        """``h + scaling * (x_e @ A_e^T) @ B_e^T`` per expert block for each active adapter: two grouped GEMMs on the
        rows the base GEMM read (padding rows are zero and stay zero), never a ``[E, out, in]`` delta.

        They run in the compute dtype, outside any FP8 autocast: the rank is rarely a multiple of the FP8 GEMM
        dimension (16), and the factors train, so quantizing them every step would cost more than their GEMMs (``r /
        in`` of the base GEMM's work) and put FP8 error into the update. On CUDA in BF16 that is torch's grouped_mm
        on the routing's device offsets (one launch per factor on every GEMM path, the rank zero-padded to a multiple
        of 8; TE's native grouped GEMM fails on a rank of 16 with a misaligned address, H100, cuBLASLt 13.10);
        elsewhere the base GEMM's own path (TE engines, or the torch loop on the CPU)."""
        if self.lora is None:
            return h
        native = use_te and (route.splits is None or native_grouped_gemm(None, x.dtype))
        high_precision: AbstractContextManager = nullcontext()
        if use_te and active_recipe() is not None:
            import transformer_engine.pytorch as te

            high_precision = te.autocast(enabled=False)
        on_grouped_mm = grouped_mm_runs(x.device, x.dtype, [x.size(1), h.size(1)])
        for factors in self.lora.adapters(name, x.dtype):
            if on_grouped_mm:
                up = grouped_mm_linear(grouped_mm_linear(x, factors.A, route.offsets), factors.B, route.offsets)
            else:
                key = f"{name}.lora.{factors.adapter}.r{factors.A.size(1)}"
                with high_precision:
                    low = self._gemm(f"{key}.A", LoraFactor(factors.A), x, route, use_te, native=native)
                    up = self._gemm(f"{key}.B", LoraFactor(factors.B), low, route, use_te, native=native)
            h = torch.add(h, up.to(h.dtype), alpha=factors.scaling)
        return h

    def invalidate_quantized_weights(self) -> None:
        """Make TE quantize the expert weights again on the next FP8 forward (after changing them out of band)."""
        for engine in self._engines.values():
            engine.weight_cache.invalidate()
        invalidate_graphs()  # a captured graph reads the weights by address
        for name, layer in (("fc1", self.fc1), ("fc2", self.fc2)):
            self._resident[name].release(layer.weight)

    def keep_no_quantized_weights(self) -> None:
        """Quantize on every call and keep no quantized copy between calls, frozen weights included: what a sharded
        module needs (FSDP gathers the whole weight for a call and frees it after; a copy kept between calls is the
        whole weight on every rank: 24 layers x 1.6 GB for GPT-OSS-20B's experts in FP8, the inferred share of an
        out-of-memory at full size on 4 x H100, docs/distributed.md)."""
        self.invalidate_quantized_weights()
        self.cache_quantized_weights = False
        self._engines.clear()  # TE's cached copies go with them; rebuilt, caching nothing, on the next CUDA forward
        for resident in self._resident.values():
            resident.enabled = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engines"] = {}  # TE engines hold no weights; rebuilt on the next CUDA forward
        return state

    def extra_repr(self) -> str:
        fp8 = "fp8 allowed" if self.fp8_reason is None else f"bf16 only ({self.fp8_reason})"
        return f"activation={activation_label(self.activation)}, backend={self.backend}, {fp8}"


def _write_original_layout(module: GroupedExperts, destination: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict post-hook: replace ``fc1.*``/``fc2.*`` by the original module's keys (unless sharded)."""
    if not module.original_layout:
        return
    ours = {n: destination.pop(prefix + n) for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
            if prefix + n in destination}
    weights = ExpertWeights(ours["fc1.weight"], ours.get("fc1.bias"), ours["fc2.weight"], ours.get("fc2.bias"))
    for key, value in module.codec.encode(weights).items():
        destination[prefix + key] = value


def _read_original_layout(module: GroupedExperts, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Load pre-hook: accept the original module's keys (checkpoints of either model) as well as ours."""
    keys = module.codec.keys()
    if not all(prefix + k in state_dict for k in keys):
        return
    weights = module.codec.decode({k: state_dict.pop(prefix + k) for k in keys})
    state_dict[prefix + "fc1.weight"] = weights.fc1_weight
    state_dict[prefix + "fc2.weight"] = weights.fc2_weight
    if weights.fc1_bias is not None:
        state_dict[prefix + "fc1.bias"] = weights.fc1_bias
    if weights.fc2_bias is not None:
        state_dict[prefix + "fc2.bias"] = weights.fc2_bias

