"""Out of GPU memory in a training step: free memory the next way the model allows, and run the step again.

A step that does not fit used to end the run. The plugin's ``optimizer_step`` runs Lightning's closure (the training
step, ``zero_grad`` and the backward) through :class:`MemoryFallback`: on ``torch.cuda.OutOfMemoryError`` it takes the
next rung of its ladder that applies to the model, records the decision (kind ``memory``) and runs the closure again
on the same batch. The plan says which ladder (``Plan.graphed_recompute``, rule ``graphed-recompute-hopper``):

- :data:`GRAPHED_RECOMPUTE_LADDER` (Hopper): first the graphed layers recompute (activation checkpointing inside the
  CUDA graphs, :func:`.graphs.recompute_in_graphs`): a layer keeps its input and output between forward and backward
  instead of its saved activations, and the step stays two launches a layer. GPT-OSS-20B with LoRA at 8 x 1,024
  tokens: 483-560 ms at 98% GPU busy on cuBLASLt 13.1, against 545-633 ms at 86% on the other ladder; 496.5 ms at 98%
  on 13.10 with LoRA on the experts, against 728 ms at 67% (H200 capped at 78.5 GiB, 2026-11-28,
  ``benchmarks/full_model.py``);
- :data:`MEMORY_LADDER` (where that was not measured): first the CUDA graphs off (their pools hold every layer's
  saved activations between steps).

Both end on eager activation checkpointing: the graphs removed, transformers' ``gradient_checkpointing_enable`` on
the decoder layers (non-reentrant; the recompute runs under the forward's precision, :mod:`.recompute`).
GPT-OSS-20B with LoRA at 8 x 1,024 tokens ran at 58.8 GiB with it where the step without ran out of memory on an
80 GB H100 (cuBLASLt 13.10, 2026-11-28).

After the rung the quantized copies held for frozen weights move to the host and back
(:func:`.experts.resident.parked_resident_weights`): made in the first forward between that step's activations,
they keep the activations' segments reserved, their free memory unusable for a large allocation (on cuBLASLt 13.10
the graphed LoRA step above did not fit without this: 30.4 GiB free held by 15.4 GiB of copies). Each decision's
evidence holds the caching allocator's allocated and reserved GiB at the failure and after the rung
(:func:`gpu_memory`): memory a rung did not give back shows in the log. When no rung is left the error is raised as
it was. Running the closure again is the same step: Lightning zeroes the gradients inside it, after the training
step and before the backward, so whatever a failed backward accumulated is cleared. That holds under automatic
optimization without gradient accumulation only (a micro-batch's gradients from before would be lost), and on one
process (the other ranks would wait in a collective): elsewhere the error is raised as is, with a decision saying
why it was not recovered. The rungs taken are not saved in checkpoints: a resumed run finds them again, one failed
step each.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .experts.resident import parked_resident_weights
from .graphs import dispatchers, drop_graphs, recompute_in_graphs, remove_cuda_graphs
from .guard.decisions import DecisionLog


@dataclass(frozen=True)
class MemoryRung:
    """One way to need less memory: whether it applies to a model, and applying it (returns what it changed)."""

    name: str
    applies: Callable[[nn.Module], bool]
    apply: Callable[[nn.Module], str]


def _graphed(model: nn.Module) -> bool:
    return bool(dispatchers(model))


def _graphs_off(model: nn.Module) -> str:
    layers = len(dispatchers(model))
    drop_graphs(model)
    remove_cuda_graphs(model)
    return f"CUDA graphs removed from {layers} decoder layers (their memory pools freed); they run eagerly"


def _graphed_without_recompute(model: nn.Module) -> bool:
    found = dispatchers(model)
    return bool(found) and not all(d.recompute for d in found)


def _graphs_recompute(model: nn.Module) -> str:
    layers = recompute_in_graphs(model)
    return (f"the {layers} graphed decoder layers recompute their forward in the backward (activation checkpointing "
            "inside the CUDA graphs; their memory pools freed, captured again after a warm-up)")


def _checkpointable(model: nn.Module) -> Optional[nn.Module]:
    """The outermost transformers model in ``model`` that supports checkpointing and does not checkpoint yet."""
    for module in model.modules():
        if getattr(module, "supports_gradient_checkpointing", False) and callable(
                getattr(module, "gradient_checkpointing_enable", None)):
            return None if getattr(module, "is_gradient_checkpointing", False) else module
    return None


def _checkpointing_on(model: nn.Module) -> str:
    target = _checkpointable(model)
    assert target is not None
    graphed = len(dispatchers(model))
    drop_graphs(model)
    remove_cuda_graphs(model)
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    removed = f"CUDA graphs removed from {graphed} decoder layers; " if graphed else ""
    return (f"{removed}activation checkpointing on for {type(target).__name__} (non-reentrant; the decoder layers "
            "recompute their forward in the backward, under the forward's precision)")


#: Eager activation checkpointing, the last rung of both ladders: it costs a recompute of every layer's forward
#: (+38-65% step time at 1,024-4,096 tokens, GPT-OSS-20B on one H100, cuBLASLt 13.1, 2026-11-27).
_CHECKPOINTING = MemoryRung("activation_checkpointing", lambda m: _checkpointable(m) is not None, _checkpointing_on)

#: The rungs, in the order they are taken, where the plan does not recompute inside the graphs.
MEMORY_LADDER: tuple[MemoryRung, ...] = (MemoryRung("cuda_graphs_off", _graphed, _graphs_off), _CHECKPOINTING)
#: Where it does (``Plan.graphed_recompute``).
GRAPHED_RECOMPUTE_LADDER: tuple[MemoryRung, ...] = (
    MemoryRung("graphs_recompute", _graphed_without_recompute, _graphs_recompute), _CHECKPOINTING)


def gpu_memory() -> dict[str, float]:
    """The caching allocator's allocated and reserved GiB on the current device ({} where CUDA is not in use): a
    decision's evidence, so that memory a rung did not give back shows in the log."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}


class MemoryFallback:
    """Runs a training step's closure; on out-of-memory takes the next applicable rung of its ladder and runs it
    again (see the module doc). ``taken``: the rungs taken so far, by name."""

    def __init__(self, decisions: DecisionLog, enabled: bool = True, graphed_recompute: bool = False) -> None:
        self.decisions = decisions
        self.enabled = enabled
        #: Which ladder: the plan's ``graphed_recompute`` (set by the plugin at setup).
        self.graphed_recompute = graphed_recompute
        self.taken: list[str] = []

    def run(self, closure: Callable[[], Any], model: nn.Module, trainer: Any = None) -> Any:
        while True:
            try:
                return closure()
            except torch.cuda.OutOfMemoryError as err:
                step = getattr(trainer, "global_step", 0)
                text = str(err).strip()
                error = text.splitlines()[0][:300] if text else "out of memory"
                at_failure = gpu_memory()
                why_not = self._not_recoverable(trainer)
                rung = None if why_not else self._next(model)
                if rung is None:
                    reason = why_not or f"no way left to need less memory (taken: {', '.join(self.taken) or 'none'})"
                    self.decisions.record("memory", f"out of GPU memory at step {step}, not recovered: {reason}",
                                          rule="memory-fallback", step=step,
                                          evidence={"error": error, "at_failure": at_failure})
                    raise
            # Outside the handler: the failed step's frames (and the tensors they hold) went with the exception. The
            # rung first, then the collection: the graphs a rung drops give their pools back to the cache here.
            change = rung.apply(model)
            with parked_resident_weights(model) as compacted:  # back in packed memory once the cache is emptied
                gc.collect()
                torch.cuda.empty_cache()
            self.taken.append(rung.name)
            if compacted:
                change += f"; the frozen weights' quantized copies packed anew ({compacted / 2**30:.1f} GiB)"
            self.decisions.record("memory", f"out of GPU memory at step {step}: {change}; the step runs again",
                                  rule="memory-fallback", step=step, to=rung.name,
                                  evidence={"error": error, "taken": list(self.taken), "at_failure": at_failure,
                                            "after_rung": gpu_memory(), "compacted_gib": round(compacted / 2**30, 2)})

    def _not_recoverable(self, trainer: Any) -> Optional[str]:
        if not self.enabled:
            return "memory_fallback=False"
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            return "several processes (the other ranks would wait for this one in a collective)"
        if trainer is not None and getattr(trainer, "accumulate_grad_batches", 1) > 1:
            return ("gradient accumulation (the step's earlier micro-batches' gradients cannot be told from the failed "
                    "backward's)")
        if trainer is not None and not getattr(getattr(trainer, "lightning_module", None), "automatic_optimization",
                                               True):
            return "manual optimization (only Lightning's own closure zeroes the gradients before its backward)"
        return None

    def _next(self, model: nn.Module) -> Optional[MemoryRung]:
        ladder = GRAPHED_RECOMPUTE_LADDER if self.graphed_recompute else MEMORY_LADDER
        return next((rung for rung in ladder if rung.applies(model)), None)
