"""Sharding a swapped model: what the FSDP units are, how FSDP casts, and the one call for FSDP2's ``configure_model``.

Lightning's ``FSDPStrategy`` converts the module (the plugin plans, swaps and casts) and then wraps it, so the swaps
run first by themselves; :func:`fsdp_wrap_policy` makes every ``GroupedExperts`` module and every decoder layer its
own FSDP unit. ``ModelParallelStrategy`` calls the user's ``configure_model`` (where FSDP2's ``fully_shard`` runs)
*before* it converts the module, so there the swaps must run inside ``configure_model``, ahead of ``fully_shard``:
:func:`shard_model` does both, :func:`prepare_model` only the plugin's part for users who shard themselves.

FSDP all-gathers each unit's parameters in the compute dtype of the plan (BF16) and reduces gradients in FP32 (as
torchtitan's defaults do); a ladder with an FP32 rung all-gathers in FP32, since a step-down to
FP32 must compute on FP32 weights. Under an FP8 recipe TE quantizes the gathered weight in the forward and again from
the gathered weight in the backward (``te.Linear``'s ``is_fsdp2`` path); the FP32 master weights stay sharded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import nn

from ..experts import GroupedExperts

if TYPE_CHECKING:
    from ..plugin import TEMoEPrecision
    from ..policy import Plan


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP (either version) or tensor parallelism has already taken ``module``'s parameters over."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return (any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())
            or any(isinstance(p, DTensor) for p in module.parameters()))


def ready_for_sharding(module: nn.Module) -> None:
    """Set the swapped modules of ``module`` up for sharded weights: every ``GroupedExperts`` writes its
    ``state_dict`` in the grouped layout, whose keys are its parameters' names (as torch's distributed checkpoint and
    FSDP's state dicts require), and no swapped module keeps quantized weights between calls (each would be a whole,
    unsharded copy on every rank)."""
    for m in module.modules():
        if isinstance(m, GroupedExperts):
            m.original_layout = False
        keep_none = getattr(m, "keep_no_quantized_weights", None)
        if keep_none is not None:
            keep_none()


def layer_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The decoder-layer classes of the transformers models inside ``module`` (their ``_no_split_modules``)."""
    names = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return {type(m) for m in module.modules() if type(m).__name__ in names}


def shard_units(module: nn.Module, layers: Optional[Iterable[type[nn.Module]]] = None) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first: every ``GroupedExperts``, then every decoder layer
    (``layers``, default :func:`layer_classes`)."""
    classes = tuple(layers) if layers is not None else tuple(layer_classes(module))
    experts = [m for m in module.modules() if isinstance(m, GroupedExperts)]
    return experts + [m for m in module.modules() if classes and isinstance(m, classes)]


def fsdp_wrap_policy(module: nn.Module, layers: Optional[Iterable[type[nn.Module]]] = None) -> Any:
    """FSDP's ``auto_wrap_policy`` with each ``GroupedExperts`` module and each decoder layer as one unit."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = set(layers) if layers is not None else layer_classes(module)
    return ModuleWrapPolicy({GroupedExperts, *classes})


def gather_dtype(plan: Plan) -> Optional[torch.dtype]:
    """The dtype FSDP all-gathers parameters in: the plan's compute dtype, or None (the parameters' own, FP32)
    when a rung of the ladder computes in FP32."""
    if any(rung.dense.name == "fp32" or rung.experts.name == "fp32" for rung in plan.ladder):
        return None
    return plan.ladder[0].dense.compute_dtype


def fsdp_mixed_precision(plan: Plan) -> Any:
    """FSDP's ``MixedPrecision`` for ``plan``: gather in :func:`gather_dtype`, reduce gradients in FP32."""
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=gather_dtype(plan), reduce_dtype=torch.float32)


#: The dtypes FSDP2 may reduce gradients in: FP32 (the default, torchtitan's) or BF16 (half the reduce-scatter's
#: bytes: a full fine-tune of GPT-OSS-20B reduces 84 GB of FP32 gradients a step over its ranks).
REDUCE_DTYPES = (torch.float32, torch.bfloat16)


def check_reduce_dtype(reduce_dtype: torch.dtype) -> None:
    """One error, before anything is swapped or sharded, for a reduce dtype FSDP2 is not given here."""
    if reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"reduce_dtype={reduce_dtype} is not supported: FSDP2 reduces gradients in one of"
                         f" {', '.join(map(str, REDUCE_DTYPES))}")


def fsdp2_mixed_precision(plan: Plan, reduce_dtype: torch.dtype = torch.float32) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``plan`` (see :func:`fsdp_mixed_precision`), reducing gradients in
    ``reduce_dtype`` (one of :data:`REDUCE_DTYPES`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    check_reduce_dtype(reduce_dtype)
    return MixedPrecisionPolicy(param_dtype=gather_dtype(plan), reduce_dtype=reduce_dtype)


def plugin_of(module: nn.Module) -> TEMoEPrecision:
    """The ``TEMoEPrecision`` of the Trainer ``module`` is attached to; an error naming what is missing."""
    from ..plugin import TEMoEPrecision

    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        raise RuntimeError(f"{type(module).__name__} is not attached to a Trainer: call prepare_model/shard_model from"
                           " the LightningModule's configure_model, where the Trainer is set")
    plugin = trainer.strategy.precision_plugin
    if not isinstance(plugin, TEMoEPrecision):
        raise TypeError(f"the Trainer's precision plugin is {type(plugin).__name__}, not TEMoEPrecision: pass"
                        " plugins=[TEMoEPrecision(...)] to the Trainer")
    return plugin


def prepare_model(module: nn.Module) -> TEMoEPrecision:
    """Plan, swap and cast ``module`` now (what the plugin does at setup), so that a ``fully_shard`` or tensor
    parallelism that follows in ``configure_model`` shards the swapped modules. Returns the plugin."""
    plugin = plugin_of(module)
    plugin.prepare_for_sharding(module)
    return plugin


def shard_model(module: nn.Module, mesh: Any = None, layers: Optional[Iterable[type[nn.Module]]] = None,
                reshard_after_forward: bool = True, reduce_dtype: torch.dtype = torch.float32) -> list[nn.Module]:
    """For ``ModelParallelStrategy``: call in ``configure_model``. Prepares ``module`` (:func:`prepare_model`), then
    shards it with :func:`fully_shard_units`, the roots being each child of the LightningModule that holds
    parameters. ``mesh`` defaults to the strategy's data-parallel mesh; ``reduce_dtype`` is the gradients'
    reduce dtype (:data:`REDUCE_DTYPES`), checked before anything is swapped.

    Returns the sharded modules (none when ``module`` is sharded already); the plugin records them as a ``shard``
    decision.
    """
    if is_sharded(module):  # configure_model runs again for each fit/validate/test
        return []
    check_reduce_dtype(reduce_dtype)
    plugin = prepare_model(module)
    assert plugin.state is not None
    if mesh is None:
        device_mesh = getattr(module, "_device_mesh", None)
        mesh = device_mesh["data_parallel"] if device_mesh is not None else None
    roots = [child for child in module.children() if any(True for _ in child.parameters())]
    sharded, summary, details = fully_shard_units(module, plugin.state.plan, roots, mesh, layers,
                                                  reshard_after_forward, reduce_dtype)
    plugin.record_sharding(summary, details)
    return sharded


def fully_shard_units(module: nn.Module, plan: Plan, roots: list[nn.Module], mesh: Any = None,
                      layers: Optional[Iterable[type[nn.Module]]] = None,
                      reshard_after_forward: bool = True, reduce_dtype: torch.dtype = torch.float32,
                      ) -> tuple[list[nn.Module], str, dict[str, Any]]:
    """Apply FSDP2's ``fully_shard`` with ``plan``'s casts (gradients reduced in ``reduce_dtype``) to every
    :func:`shard_units` module of the (swapped) ``module``, innermost first, then to ``roots``, after
    :func:`ready_for_sharding`. Returns the sharded modules, and the summary and details of a ``shard`` decision.

    Under Fabric's ``ModelParallelStrategy`` call it from the ``parallelize_fn`` (Fabric converts the module first):
    ``fully_shard_units(model, precision.plan, [model], mesh["data_parallel"])``.
    """
    from torch.distributed.fsdp import fully_shard

    check_reduce_dtype(reduce_dtype)
    ready_for_sharding(module)
    policy = fsdp2_mixed_precision(plan, reduce_dtype)
    units = shard_units(module, layers)
    for unit in [*units, *roots]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    experts = sum(isinstance(u, GroupedExperts) for u in units)
    size = mesh.size() if mesh is not None else torch.distributed.get_world_size()
    summary = (f"FSDP2 fully_shard over {size} rank(s): {experts} GroupedExperts module(s), {len(units) - experts}"
               f" decoder layer(s) and {len(roots)} root(s) as units;"
               f" {_gather_text(policy.param_dtype, reduce_dtype)}; quantized weights not kept between calls")
    details = {"strategy": "fsdp2", "ranks": size, "experts_units": experts, "layer_units": len(units) - experts,
               "roots": len(roots), "param_dtype": str(policy.param_dtype), "reduce_dtype": str(policy.reduce_dtype)}
    return [*units, *roots], summary, details


def _gather_text(param_dtype: Optional[torch.dtype], reduce_dtype: torch.dtype) -> str:
    gather = str(param_dtype).removeprefix("torch.") if param_dtype is not None else "the parameters' dtype (a rung"
    gather += " computes in FP32)" if param_dtype is None else ""
    return f"parameters all-gathered in {gather}, gradients reduced in {str(reduce_dtype).removeprefix('torch.')}"
