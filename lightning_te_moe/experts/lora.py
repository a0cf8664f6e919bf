"""PEFT LoRA on swapped experts: PEFT's ``target_parameters`` adapters run as grouped low-rank GEMMs.

PEFT adapts a 3-D expert parameter (``gate_up_proj``, ``down_proj``) by wrapping the experts module in a
``lora.ParamWrapper`` (nested, one per targeted parameter) that parametrizes the parameter as ``W + scaling * B A``
on every forward: a dense per-expert delta the size of the expert weights, built and thrown away each step.

The swap keeps PEFT's wrappers, and with them PEFT's own adapter parameters, state-dict keys and controls
(``save_pretrained``, ``get_peft_model_state_dict``, ``disable_adapter()``, ``set_adapter``, ``merge_and_unload``),
and replaces only the module they wrap by :class:`~.module.GroupedExperts`. The wrappers become
:class:`GroupedParamWrapper` (a ``ParamWrapper`` whose forward passes straight through), and the grouped module adds
``scaling * (x_e @ A_e^T) @ B_e^T`` for every active adapter to each expert's padded block: two grouped GEMMs on
the rows the base GEMM already has (:meth:`ExpertsLoRA.adapters`); no delta is formed. Merging adds the per-expert
delta to the grouped weights once.

PEFT's factor layout (``peft/tuners/lora/layer.py``, ``ParamWrapper.get_delta_weight``): ``lora_A.<adapter>.weight
[E * r, in]`` (row ``e * r + j``, so ``[E, r, in]`` is a view) and ``lora_B.<adapter>.weight [out, r * E]``
(column ``j * E + e``), ``in``/``out`` the parameter's input and output sizes whatever its storage order. Each
forward lays ``B`` out as ``[E, out, r]`` (a copy of ``r / in`` of the expert weights' size); for GPT-OSS's
``gate_up_proj``, whose outputs alternate gate/up, that copy also de-interleaves its rows like the base weight's.

Everything that reads PEFT's classes or attributes is in this module. PEFT is never imported here before the
model's process did (a model can only hold PEFT layers if PEFT was imported).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor, nn

from .layouts import FusedCodec, WeightCodec

if TYPE_CHECKING:
    from .module import GroupedExperts


class LoraNotSwappable(Exception):
    """A PEFT-wrapped experts module the swap cannot reproduce exactly; the message goes in the swap report."""


def _tuner_layer_class() -> Optional[type]:
    """PEFT's ``BaseTunerLayer`` when PEFT is loaded (never imports it)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(tuners, "BaseTunerLayer", None) if tuners is not None else None


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (LoRA on a ``Linear``, a ``ParamWrapper``, ...)."""
    tuner = _tuner_layer_class()
    return tuner is not None and isinstance(module, tuner)


@dataclass
class PeftChain:
    """PEFT's tuner layers around one module, outermost first, and the module they wrap."""

    wrappers: list[nn.Module]
    base: nn.Module


def peft_chain(module: nn.Module) -> Optional[PeftChain]:
    """The chain of tuner layers starting at ``module``, or None when ``module`` is no tuner layer."""
    wrappers: list[nn.Module] = []
    while is_tuner_layer(module):
        wrappers.append(module)
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Module):
            return None
        module = base
    return PeftChain(wrappers, module) if wrappers else None


@dataclass(frozen=True)
class LoraSite:
    """One PEFT ``ParamWrapper`` around swapped experts: which projection of ours it adapts and how ``B``'s rows
    map to that projection's output rows."""

    wrapper: nn.Module
    projection: str
    #: ``B``'s rows alternate gate/up (GPT-OSS's ``gate_up_proj``); ours are ``[gate | up]``.
    interleaved: bool


@dataclass(frozen=True)
class Factors:
    """One adapter on one projection in our layout: ``A [E, r, in]``, ``B [E, out, r]`` (autograd views/copies of
    PEFT's parameters, so gradients land in them), and PEFT's ``scaling``."""

    adapter: str
    A: Tensor
    B: Tensor
    scaling: float

    def delta(self, expert: int) -> Tensor:
        """``scaling * B_e @ A_e`` ``[out, in]`` (merging only: the forward never forms it)."""
        return torch.mm(self.B[expert], self.A[expert]) * self.scaling


class ExpertsLoRA:
    """PEFT's LoRA wrappers around one :class:`GroupedExperts`, read on every forward with PEFT's semantics: a
    wrapper with adapters disabled or merged adds nothing; otherwise each of its active adapters adds its update."""

    def __init__(self, sites: tuple[LoraSite, ...], num_experts: int) -> None:
        self.sites = sites
        self.num_experts = num_experts

    def adapters(self, projection: str, dtype: Optional[torch.dtype] = None) -> Iterator[Factors]:
        """The adapters that act on ``projection`` now, as grouped factors (``dtype``: cast first)."""
        for site in self.sites:
            wrapper = site.wrapper
            if site.projection != projection or wrapper.disable_adapters or wrapper.merged:
                continue
            for name in wrapper.active_adapters:
                if name in wrapper.lora_A:
                    yield self.factors(site, name, dtype)

    def factors(self, site: LoraSite, adapter: str, dtype: Optional[torch.dtype] = None) -> Factors:
        wrapper, experts = site.wrapper, self.num_experts
        a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        grouped_a = a.view(experts, -1, a.size(1))
        if site.interleaved:  # row 2i + g of B is output i of half g: [e, g, i, j] -> row g * I + i
            grouped_b = b.view(b.size(0) // 2, 2, -1, experts).permute(3, 1, 0, 2).reshape(experts, b.size(0), -1)
        else:
            grouped_b = b.view(b.size(0), -1, experts).permute(2, 0, 1).contiguous()
        return Factors(adapter, grouped_a, grouped_b, float(wrapper.scaling[adapter]))

    def ranks(self) -> list[int]:
        """The rank of every adapter (the inner dimension of its grouped GEMMs)."""
        return [int(wrapper.r[name]) for wrapper in (site.wrapper for site in self.sites) for name in wrapper.lora_A]

    def site_of(self, wrapper: nn.Module) -> LoraSite:
        return next(site for site in self.sites if site.wrapper is wrapper)

    def label(self) -> str:
        """For the swap report: each adapter's rank, alpha and targets, and which are active."""
        names: dict[str, list[str]] = {}
        for site in self.sites:
            wrapper = site.wrapper
            for name in wrapper.lora_A:
                names.setdefault(name, []).append(
                    f"{wrapper.parameter_name} r={wrapper.r[name]} alpha={wrapper.lora_alpha[name]:g} "
                    f"(scaling {float(wrapper.scaling[name]):g})")
        active = {n for site in self.sites for n in site.wrapper.active_adapters}
        parts = []
        for name, targets in names.items():
            shared = {t.split(" ", 1)[1] for t in targets}
            on = ", ".join(t.split(" ", 1)[0] for t in targets)
            detail = f"{next(iter(shared))} on {on}" if len(shared) == 1 else "; ".join(targets)
            parts.append(f"LoRA '{name}'{'' if name in active else ' (inactive)'} {detail}")
        return ", ".join(parts)


def read_lora(chain: PeftChain, codec: WeightCodec, num_experts: int, shapes: dict[str, tuple[int, int]]
              ) -> ExpertsLoRA:
    """Check PEFT's wrappers around an experts module and describe them for the grouped module.

    ``shapes``: the (in, out) sizes of our ``fc1``/``fc2``. Accepted: LoRA ``ParamWrapper``s (any number of
    adapters, ranks, alphas, rsLoRA, any initialisation; merged or disabled too) on the expert weight matrices of a
    transformers 5.x experts module. Refused (:class:`LoraNotSwappable`, with the reason): other PEFT methods, LoRA
    on other parameters, LoRA variants; PEFT itself refuses dropout, DoRA and LoRA biases on ``target_parameters``.
    """
    from peft.tuners.lora.layer import ParamWrapper

    if not isinstance(codec, FusedCodec):
        raise LoraNotSwappable("PEFT adapters on this experts layout: only transformers 5.x experts with LoRA on their "
                               "parameters (LoraConfig(target_parameters=[...])) are swapped")
    projection_of = {codec.up_name: "fc1", "down_proj": "fc2"}
    sites: list[LoraSite] = []
    for wrapper in chain.wrappers:
        if not isinstance(wrapper, ParamWrapper):
            raise LoraNotSwappable(f"PEFT {type(wrapper).__name__} on the experts: only LoRA on the expert weights "
                                   "(LoraConfig(target_parameters=[...])) is swapped; other PEFT methods are not")
        projection = projection_of.get(wrapper.parameter_name)
        if projection is None:
            raise LoraNotSwappable(f"LoRA on {wrapper.parameter_name!r}: only the expert weight matrices "
                                   f"({', '.join(projection_of)}) are supported")
        if any(site.projection == projection for site in sites):
            raise LoraNotSwappable(f"{wrapper.parameter_name!r} is wrapped by LoRA twice")
        in_features, out_features = shapes[projection]
        for name in wrapper.lora_A:
            _check_adapter(wrapper, name, num_experts, in_features, out_features)
        sites.append(LoraSite(wrapper, projection, projection == "fc1" and codec.gated and codec.interleaved))
    return ExpertsLoRA(tuple(sites), num_experts)


def _check_adapter(wrapper: Any, name: str, num_experts: int, in_features: int, out_features: int) -> None:
    """One adapter of a ParamWrapper is plain LoRA with factors of the shapes PEFT's layout implies."""
    if not isinstance(wrapper.lora_dropout[name], nn.Identity):
        raise LoraNotSwappable("lora_dropout on expert parameters: PEFT defines no dropout for target_parameters "
                               "(its ParamWrapper refuses it), so there is no reference to reproduce")
    if wrapper.use_dora.get(name) or wrapper.lora_bias.get(name) or name in wrapper.lora_variant:
        raise LoraNotSwappable(f"adapter {name!r} is a LoRA variant (DoRA, LoRA bias, ...): only plain LoRA is swapped")
    a, b, rank = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, int(wrapper.r[name])
    if a.shape != (num_experts * rank, in_features) or b.shape != (out_features, rank * num_experts):
        raise LoraNotSwappable(f"LoRA factors of {wrapper.parameter_name!r} ({name!r}) are {tuple(a.shape)} and "
                               f"{tuple(b.shape)}; expected {(num_experts * rank, in_features)} and "
                               f"{(out_features, rank * num_experts)}")


def attach(experts: GroupedExperts, lora: ExpertsLoRA) -> None:
    """The grouped module applies the adapters from now on; PEFT's wrappers pass through to it."""
    experts.lora = lora
    for site in lora.sites:
        site.wrapper.__class__ = grouped_param_wrapper()


def detach(experts: GroupedExperts) -> None:
    """PEFT's wrappers apply their adapters again (before the original experts module is put back)."""
    lora, experts.lora = experts.lora, None
    if lora is None:
        return
    from peft.tuners.lora.layer import ParamWrapper

    for site in lora.sites:
        if isinstance(site.wrapper, grouped_param_wrapper()):
            site.wrapper.__class__ = ParamWrapper


def _merge(wrapper: Any, adapter: str, sign: float, safe: bool = False) -> None:
    """Add (``sign=1``) or subtract one adapter's delta to the grouped weight it adapts, as PEFT's
    ``ParamWrapper.merge``: the delta in the adapter's dtype, added in the weight's; ``safe`` refuses non-finite."""
    experts = wrapper.get_base_layer()
    lora: ExpertsLoRA = experts.lora
    site = lora.site_of(wrapper)
    weight = getattr(experts, site.projection).weight
    with torch.no_grad():
        factors = lora.factors(site, adapter)
        merged = weight.clone() if safe else weight
        for e in range(merged.size(0)):
            merged[e] += sign * factors.delta(e).to(merged.dtype)
        if safe:
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.copy_(merged)


@lru_cache(maxsize=1)
def grouped_param_wrapper() -> type:
    """:class:`GroupedParamWrapper`, built on first use (it subclasses PEFT's ``ParamWrapper``)."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class GroupedParamWrapper(ParamWrapper):
        """PEFT's ``ParamWrapper`` over swapped experts: :class:`~.module.GroupedExperts` applies the adapter on its
        grouped GEMMs, so the forward passes through (keeping PEFT's own argument checks and its unmerge-on-disable);
        merge/unmerge add or subtract the delta in the grouped weights."""

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
            elif adapter_names is not None:
                raise ValueError(f"lora.{ParamWrapper.__name__} does not support mixed batch inference")
            return self.base_layer(x, *args, **kwargs)

        def get_param(self) -> Tensor:
            raise RuntimeError(f"{self.parameter_name!r} is held by lightning-te-moe's grouped experts in their own "
                               "layout: call lightning_te_moe.experts.unswap_experts(model) before changing adapters")

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            for name in check_adapters_to_merge(self, adapter_names):
                if name in self.lora_A:
                    _merge(self, name, 1.0, safe_merge)
                    self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    _merge(self, name, -1.0)

        def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                               adapter_names: Optional[list[str]]) -> nn.Module:
            base = super().unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
            detach(base)  # the grouped module keeps no adapter: PEFT's wrappers are gone
            return base

    GroupedParamWrapper.__module__ = __name__
    GroupedParamWrapper.__qualname__ = GroupedParamWrapper.__name__
    return GroupedParamWrapper


def __getattr__(name: str) -> Any:
    """``GroupedParamWrapper`` by name (pickle finds it), built lazily like PEFT's import."""
    if name == "GroupedParamWrapper":
        return grouped_param_wrapper()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
