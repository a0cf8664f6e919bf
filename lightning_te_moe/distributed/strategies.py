"""Which Lightning strategies the plugin serves, as data: each supported one with how it is served, each refused one
with why. Matched by class name along the strategy's MRO (most derived first), so DeepSpeed (a ``DDPStrategy``
subclass) is refused before DDP matches, and neither DeepSpeed nor torch_xla has to be importable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..policy import Plan, Reason

StrategyKind = Literal["single", "ddp", "fsdp", "fsdp2"]


@dataclass(frozen=True)
class StrategySupport:
    """How the plugin runs under one Lightning strategy."""

    strategy: str
    kind: StrategyKind
    how: str


#: The strategies the plugin serves, and how.
SUPPORTED: tuple[StrategySupport, ...] = (
    StrategySupport("SingleDeviceStrategy", "single", "one device"),
    StrategySupport("DDPStrategy", "ddp", "every rank swaps the same modules before DDP wraps the model"),
    StrategySupport("FSDPStrategy", "fsdp",
                    "FSDP: the swaps run before wrapping, each GroupedExperts module and decoder layer is one FSDP unit"
                    " (lightning_te_moe.distributed.fsdp_wrap_policy, set when no auto_wrap_policy is given)"),
    StrategySupport("ModelParallelStrategy", "fsdp2",
                    "FSDP2: call lightning_te_moe.distributed.shard_model(self) in configure_model (or"
                    " prepare_model(self) before your own fully_shard), so the swaps run before sharding"),
)

#: Strategies the plugin cannot serve, and why (checked first).
REFUSED: dict[str, str] = {
    "DeepSpeedStrategy": "DeepSpeed's engine runs its own mixed precision and optimizer step (DeepSpeedPrecision),"
                         " so the plan's autocast, ladder and divergence guard cannot act",
    "XLAStrategy": "Transformer Engine runs on CUDA GPUs, not on XLA devices",
    "XLAFSDPStrategy": "Transformer Engine runs on CUDA GPUs, not on XLA devices",
    "SingleDeviceXLAStrategy": "Transformer Engine runs on CUDA GPUs, not on XLA devices",
}


def strategy_support(strategy: Any) -> StrategySupport:
    """The plugin's support for ``strategy``; a strategy it cannot serve is one error naming those it can."""
    supported = {s.strategy: s for s in SUPPORTED}
    for cls in type(strategy).__mro__:
        if cls.__name__ in REFUSED:
            raise ValueError(f"TEMoEPrecision cannot run under {type(strategy).__name__}: {REFUSED[cls.__name__]}."
                             f" It runs under {_supported_names()}.")
        if cls.__name__ in supported:
            return supported[cls.__name__]
    raise ValueError(f"TEMoEPrecision does not know the strategy {type(strategy).__name__}: it runs under"
                     f" {_supported_names()} (and their subclasses).")


def _supported_names() -> str:
    return ", ".join(f"{s.strategy} ({s.how})" for s in SUPPORTED)


def amax_reduction_group(recipe_name: str) -> Any:
    """The process group TE's autocast reduces delayed scaling's amaxes over: every rank (each one data parallel,
    or data times tensor parallel as Megatron-LM's amax group), so all ranks quantize with the same scales; None
    (nothing to reduce) for other recipes or one process."""
    import torch.distributed as dist

    if recipe_name != "fp8_delayed" or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def distributed_reasons(plan: Plan, sharded: bool, world_size: int) -> tuple[Reason, ...]:
    """What the plan does differently on ``world_size`` ranks (with ``sharded`` parameters): the explained additions."""
    if world_size <= 1:
        return ()
    names = {spec.name for rung in plan.ladder for spec in (rung.dense, rung.experts)}
    reasons = []
    if "fp8_delayed" in names:
        reasons.append(Reason(
            "fp8-delayed-amax-reduction",
            f"delayed scaling on {world_size} ranks: TE reduces every amax over all ranks (autocast"
            " amax_reduction_group=WORLD, DelayedScaling.reduce_amax=True) at each autocast exit, so every rank"
            " quantizes with the same scales (one all-reduce per step)",
            "TE pytorch/quantization.py reduce_and_update_fp8_tensors"))
    if sharded and any(spec.is_te for rung in plan.ladder for spec in (rung.dense, rung.experts)):
        reasons.append(Reason(
            "fp8-sharded-params",
            "FP8 with sharded parameters: the master weights stay sharded in their own dtype; FSDP all-gathers them"
            " in the compute dtype and TE quantizes the gathered weight in the forward and again in the backward"
            " (te.Linear's FSDP2 path). FP8 all-gathers (TE quantized_model_init parameters) are not used: they"
            " hold no high-precision master weight for the ladder's BF16 rung",
            "TE pytorch/module/linear.py is_fsdp2; TE examples/pytorch/fsdp"))
    if sharded and any(rung.experts.is_te for rung in plan.ladder):
        reasons.append(Reason(
            "fp8-sharded-experts-memory",
            "FP8 experts with sharded parameters: the swapped experts keep no quantized weight between calls (each"
            " would be a whole gathered weight on every rank), but TE's GroupedLinear, which has no FSDP2 path, saves"
            " each layer's quantized expert weights for that layer's backward: from the end of a forward every"
            " layer's whole FP8 expert weights are on every rank (about 1.6 GB a GPT-OSS-20B layer). Activation"
            " checkpointing keeps one layer's at a time. GPT-OSS-20B at 4,096 tokens, 4 GPUs: FP8 current peaked at"
            " 104.1 GiB without checkpointing (4 x H200; it does not fit an 80 GB H100) and 51.3 GiB with it, where"
            " BF16 peaked at 68.2 GiB (4 x H100)",
            "TE pytorch/module/grouped_linear.py (no is_fsdp2); docs/distributed.md, 2026-11-28"))
    return tuple(reasons)
