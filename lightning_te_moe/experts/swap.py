"""``swap_experts`` / ``unswap_experts``: replace every recognised experts module in place, and back.

Runs before the optimizer is built (the plugin calls it from ``convert_module``; Lightning's strategy setup
converts the module, moves it to the device, then sets up optimizers), so the optimizer and DDP only ever
see the grouped parameters. A model with PEFT LoRA on the expert weights (``target_parameters``) keeps PEFT's
wrappers and adapters; only the module they wrap is swapped, and it runs the adapters (:mod:`.lora`). Apply PEFT
first, then swap (``unswap_experts`` first to add adapters to a swapped model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from torch import nn

from ..console import print_rank_zero
from ..policy.state import PrecisionState
from .activations import activation_label
from .adapters import ExpertsAdapter, ExpertsMatch, NotSwappable, registered_adapters
from .layouts import ExpertWeights
from .lora import LoraNotSwappable, PeftChain, attach, detach, peft_chain, read_lora
from .module import Backend, GroupedExperts
from .report import SwapEntry, SwapReport

#: TE's FP8 GEMMs need every matrix dimension to be a multiple of this.
FP8_DIM_MULTIPLE = 16


@dataclass
class ExpertSwapConfig:
    """How to swap (the torchao ``convert_to_float8_training`` style: a config plus a module filter).

    Args:
        backend: ``"auto"`` (TE on CUDA when it imports, torch otherwise; BF16 experts off TE's native grouped GEMM
            run torch's grouped_mm up to ``GROUPED_MM_MAX_TOKENS`` tokens a call), ``"te"`` (TE's GEMMs at every
            size) or ``"torch"``.
        module_filter: ``(module, fully_qualified_name) -> bool``; False leaves that experts module alone.
        adapters: adapters to try, in order (default: the registered ones).
        cache_quantized_weights: under FP8, let TE keep the quantized expert weights between forwards while
            they are unchanged (gradient-accumulation micro-batches, frozen experts); False quantizes on every
            forward and keeps no FP8 copy between steps (saves 2 bytes per expert weight element when the
            weights are trainable and there is one micro-batch per step, where the cache never hits).
    """

    backend: Backend = "auto"
    module_filter: Optional[Callable[[nn.Module, str], bool]] = None
    adapters: Optional[Sequence[ExpertsAdapter]] = None
    cache_quantized_weights: bool = True


@dataclass
class SwapOrigin:
    """Kept on the replacement (not as a submodule) so :func:`unswap_experts` can restore the original."""

    original: nn.Module
    holder: nn.Module = field(repr=False)


def fp8_incompatibility(hidden_size: int, intermediate_size: int) -> Optional[str]:
    """Why TE cannot run these expert GEMMs in FP8, or None."""
    bad = [f"{name} {size}" for name, size in (("hidden size", hidden_size), ("intermediate size", intermediate_size))
           if size % FP8_DIM_MULTIPLE]
    if not bad:
        return None
    return f"{' and '.join(bad)} not a multiple of {FP8_DIM_MULTIPLE} (TE FP8 GEMMs need it): stays BF16"


def swap_experts(model: nn.Module, config: Optional[ExpertSwapConfig] = None, *,
                 state: Optional[PrecisionState] = None,
                 module_filter: Optional[Callable[[nn.Module, str], bool]] = None) -> SwapReport:
    """Replace every experts module an adapter recognises by a :class:`GroupedExperts` (in place).

    ``state`` is the plugin's precision state (the swapped modules follow its experts recipe); without it
    they run in whatever precision surrounds them. Returns the report; nothing is printed.
    """
    config = config or ExpertSwapConfig()
    keep = module_filter or config.module_filter
    adapters = tuple(config.adapters) if config.adapters is not None else registered_adapters()
    report = SwapReport(type(model).__name__)
    done: list[str] = []
    for path, module in list(model.named_modules()):
        if any(path.startswith(p + ".") for p in done):
            continue
        if isinstance(module, GroupedExperts):
            module.state = state
            report.entries.append(SwapEntry(path, type(module).__name__, "already swapped"))
            done.append(path)
            continue
        if path.rsplit(".", 1)[-1] in ("shared_experts", "shared_expert"):
            report.entries.append(SwapEntry(path, type(module).__name__, "kept dense",
                                            "shared experts: a dense MLP every token runs"))
            done.append(path)
            continue
        entry = _try_swap(model, path, module, adapters, config, state, keep)
        if entry is not None:
            report.entries.append(entry)
            done.append(path)
    return report


def _try_swap(model: nn.Module, path: str, module: nn.Module, adapters: Sequence[ExpertsAdapter],
              config: ExpertSwapConfig, state: Optional[PrecisionState],
              keep: Optional[Callable[[nn.Module, str], bool]]) -> Optional[SwapEntry]:
    chain = peft_chain(module)
    if chain is not None:  # PEFT's wrappers stay; the module they wrap is the one swapped
        path, module = path + ".base_layer" * len(chain.wrappers), chain.base
    name = type(module).__name__
    for adapter in adapters:
        try:
            match = adapter.match(module)
        except NotSwappable as why:
            return SwapEntry(path, name, "not swappable", str(why), adapter.name)
        if match is None:
            continue
        if keep is not None and not keep(module, path):
            return SwapEntry(path, name, "filtered out", "module_filter returned False", adapter.name)
        if not path:
            return SwapEntry(path, name, "not swappable", "the root module cannot be replaced in place", adapter.name)
        mixed = _mixed_trainability(match)
        if mixed is not None:
            return SwapEntry(path, name, "not swappable", mixed, adapter.name)
        experts = _build(match, config, state)
        replacement = adapter.replace(module, experts)
        lora = ""
        if chain is not None:
            try:
                lora = _attach_lora(experts, chain, match, replacement)
            except LoraNotSwappable as why:
                return SwapEntry(path, name, "not swappable", str(why), adapter.name)
        replacement._swap_origin = SwapOrigin(module, match.holder)
        match.holder.to_empty(device="meta")  # the original keeps its structure, not a second copy of the weights
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, replacement)
        return SwapEntry(path, name, "swapped", experts.fp8_reason or "", adapter.name, experts.num_experts,
                         experts.hidden_size, experts.intermediate_size, activation_label(experts.activation),
                         experts.fc1.bias is not None, experts.fp8_reason is None, lora)
    return None


def _attach_lora(experts: GroupedExperts, chain: PeftChain, match: ExpertsMatch, replacement: nn.Module) -> str:
    """Let the grouped module run the adapters of PEFT's wrappers; the report's description of them."""
    if replacement is not experts:
        raise LoraNotSwappable("PEFT adapters on experts whose adapter replaces an enclosing block: not supported")
    shapes = {"fc1": (experts.hidden_size, experts.fc1.weight.size(1)),
              "fc2": (experts.intermediate_size, experts.hidden_size)}
    lora = read_lora(chain, match.codec, experts.num_experts, shapes)
    attach(experts, lora)
    return lora.label()


def _trainability(match: ExpertsMatch) -> dict[str, dict[bool, list[str]]]:
    """For each grouped parameter, the original parameters going into it, by their ``requires_grad``."""
    params = dict(match.holder.named_parameters())
    found: dict[str, dict[bool, list[str]]] = {}
    for key in match.codec.keys():
        if key in params:
            found.setdefault(match.codec.target(key), {}).setdefault(params[key].requires_grad, []).append(key)
    return found


def _mixed_trainability(match: ExpertsMatch) -> Optional[str]:
    """Why the module must stay as it is when some of the weights one grouped parameter gathers are frozen and
    others are not (one expert frozen, say): a grouped parameter has one ``requires_grad``."""
    for target, by_grad in _trainability(match).items():
        if len(by_grad) > 1:
            frozen = by_grad[False]
            shown = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
            return (f"{shown} frozen while {len(by_grad[True])} other parameter(s) going into the grouped {target}"
                    " train; a grouped weight has one requires_grad: freeze all experts of this layer or none")
    return None


def _build(match: ExpertsMatch, config: ExpertSwapConfig, state: Optional[PrecisionState]) -> GroupedExperts:
    """The grouped module, with weights converted once from the holder's own state dict."""
    trainable = {target: next(iter(by_grad)) for target, by_grad in _trainability(match).items()}
    source = match.codec.decode(match.holder.state_dict())
    weights = ExpertWeights(*(t.detach().clone().contiguous() if t is not None else None for t in
                              (source.fc1_weight, source.fc1_bias, source.fc2_weight, source.fc2_bias)))
    experts = GroupedExperts(weights, match.activation, match.codec, backend=config.backend,
                             fp8_reason=fp8_incompatibility(weights.hidden_size, weights.intermediate_size),
                             state=state, cache_quantized_weights=config.cache_quantized_weights)
    for target, requires_grad in trainable.items():
        experts.get_parameter(target).requires_grad_(requires_grad)
    return experts


def unswap_experts(model: nn.Module) -> int:
    """Put the original experts modules back, holding the current weights; returns how many were restored."""
    restored = 0
    for path, module in list(model.named_modules()):
        origin: Optional[SwapOrigin] = getattr(module, "_swap_origin", None)
        if origin is None:
            continue
        experts = module if isinstance(module, GroupedExperts) else module.get_submodule("experts")
        assert isinstance(experts, GroupedExperts)
        experts.release_quantized_weights()  # frozen weights parked on the host come back first
        detach(experts)  # PEFT's wrappers (if any) apply their adapters to the original again
        weight = experts.fc1.weight
        origin.holder.to_empty(device=weight.device)
        origin.holder.to(dtype=weight.dtype)
        origin.holder.load_state_dict(experts.original_state_dict(), strict=True)
        keys = set(experts.codec.keys())
        for key, param in origin.holder.named_parameters():
            if key in keys:
                param.requires_grad_(experts.get_parameter(experts.codec.target(key)).requires_grad)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, origin.original)
        restored += 1
    return restored


def swap_for_plugin(model: nn.Module, state: PrecisionState,
                    config: Optional[ExpertSwapConfig] = None) -> Optional[tuple[str, dict]]:
    """The plugin's module swap: swap and print the report (rank 0); its summary and details become a decision.

    A model without any MoE layer, or one swapped by an earlier setup of this run (Lightning converts the
    module again for each fit/validate/test), gets the printed line only: there is no new decision.
    """
    report = swap_experts(model, config, state=state)
    new = report.entries and not report.by_status("already swapped")
    print_rank_zero(report.render_text() if new else f"[lightning-te-moe] expert swap: {report.summary()}")
    return (report.summary(), report.to_dict()) if new else None

